//! A small client of the Kubernetes CRI gRPC API (`runtime.v1`), as kubelet speaks it to
//! containerd's CRI plugin (crictl is not packaged on Debian 12).
//!
//! Only the messages and fields the tests use are declared, with the field numbers of
//! `k8s.io/cri-api/pkg/apis/runtime/v1/api.proto`; protobuf skips the fields a side does not
//! know, so the subset talks to the full service. Calls are blocking: each runs on the
//! client's own single-threaded tokio runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

/// `NamespaceMode`: `POD` = 0, `CONTAINER` = 1, `NODE` = 2 (the host's), `TARGET` = 3.
pub const NAMESPACE_NODE: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// `StopPodSandboxRequest` and `RemovePodSandboxRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxId {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(string, tag = "11")]
    pub log_path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

/// `CreateContainerResponse`, `StartContainerRequest`, `RemoveContainerRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerId {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

/// `ContainerState`: `CONTAINER_CREATED` = 0, `CONTAINER_RUNNING` = 1, `CONTAINER_EXITED` = 2.
pub const CONTAINER_EXITED: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int32, tag = "7")]
    pub exit_code: i32,
    #[prost(string, tag = "9")]
    pub image_ref: String,
    #[prost(string, tag = "10")]
    pub reason: String,
    #[prost(string, tag = "11")]
    pub message: String,
    #[prost(string, tag = "15")]
    pub log_path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<ContainerStatus>,
}

const RUNTIME: &str = "runtime.v1.RuntimeService";
const IMAGES: &str = "runtime.v1.ImageService";

/// A connection to a CRI endpoint (containerd's gRPC socket).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    socket: PathBuf,
}

impl Cri {
    /// Connects to the unix socket `socket`.
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required but unused: every connection goes to the socket.
                Endpoint::from_static("http://cri.invalid")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("connecting to CRI at {}: {e}", socket.display()));
        Cri {
            rt,
            channel,
            socket: socket.to_path_buf(),
        }
    }

    /// One unary call of `/SERVICE/METHOD`.
    pub fn call<Req, Resp>(
        &self,
        service: &str,
        method: &str,
        request: Req,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let path = format!("/{service}/{method}");
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        self.rt.block_on(async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            let path = path.parse().expect("a gRPC path");
            let response = grpc
                .unary(tonic::Request::new(request), path, codec)
                .await?;
            Ok(response.into_inner())
        })
    }

    fn ok<Req, Resp>(&self, service: &str, method: &str, request: Req) -> Resp
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.call(service, method, request).unwrap_or_else(|s| {
            panic!(
                "CRI {method} at {} failed: {:?}: {}",
                self.socket.display(),
                s.code(),
                s.message()
            )
        })
    }

    pub fn version(&self) -> VersionResponse {
        self.ok(
            RUNTIME,
            "Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
    }

    /// `PullImage`; returns the image reference containerd stored (`sha256:…`).
    pub fn pull_image(&self, image: &str, sandbox: &PodSandboxConfig) -> String {
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
            }),
            sandbox_config: Some(sandbox.clone()),
        };
        let response: PullImageResponse = self.ok(IMAGES, "PullImage", request);
        response.image_ref
    }

    /// `RunPodSandbox`; returns its id.
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String, tonic::Status> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let response: RunPodSandboxResponse = self.call(RUNTIME, "RunPodSandbox", request)?;
        Ok(response.pod_sandbox_id)
    }

    /// `StopPodSandbox` then `RemovePodSandbox` (its containers go with it).
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        let id = PodSandboxId {
            pod_sandbox_id: id.into(),
        };
        self.call::<_, Empty>(RUNTIME, "StopPodSandbox", id.clone())?;
        self.call::<_, Empty>(RUNTIME, "RemovePodSandbox", id)?;
        Ok(())
    }

    /// `CreateContainer` in sandbox `pod`; returns its id.
    pub fn create_container(
        &self,
        pod: &str,
        config: ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> String {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let response: ContainerId = self.ok(RUNTIME, "CreateContainer", request);
        response.container_id
    }

    pub fn start_container(&self, id: &str) {
        let _: Empty = self.ok(
            RUNTIME,
            "StartContainer",
            ContainerId {
                container_id: id.into(),
            },
        );
    }

    pub fn container_status(&self, id: &str) -> ContainerStatus {
        let request = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let response: ContainerStatusResponse = self.ok(RUNTIME, "ContainerStatus", request);
        response.status.expect("ContainerStatus without a status")
    }

    /// Polls `ContainerStatus` until the container has exited (panics after `timeout`).
    pub fn wait_exited(&self, id: &str, timeout: std::time::Duration) -> ContainerStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = self.container_status(id);
            if status.state == CONTAINER_EXITED {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "container {id} still not exited after {timeout:?}: {status:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A pod sandbox on the host's network, IPC and PID namespaces (no CNI needed), logging under
/// `log_directory`.
pub fn host_network_pod(name: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "stratafs-test".into(),
            attempt: 0,
        }),
        // The host's UTS namespace too: a hostname cannot be set.
        hostname: String::new(),
        log_directory: log_directory.display().to_string(),
        labels: HashMap::new(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NAMESPACE_NODE,
                    pid: NAMESPACE_NODE,
                    ipc: NAMESPACE_NODE,
                }),
            }),
        }),
    }
}
