//! Compiles containerd's snapshots service description (src/snapshotter/snapshots.proto) with
//! protox, a pure-Rust protobuf compiler, so building needs no `protoc`.

fn main() {
    let proto = "src/snapshotter/snapshots.proto";
    println!("cargo:rerun-if-changed={proto}");
    let files = protox::compile([proto], ["src/snapshotter"]).expect("compiling snapshots.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(files)
        .expect("generating the snapshots service");
}
