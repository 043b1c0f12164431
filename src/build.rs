//! Compiles containerd's snapshots service description (src/snapshotter/snapshots.proto, the
//! server the snapshotter is) and the part of its content service the snapshotter reads
//! (src/snapshotter/content.proto, a client; its server for unit tests) with protox, a
//! pure-Rust protobuf compiler, so building needs no `protoc`.

fn main() {
    let snapshots = "src/snapshotter/snapshots.proto";
    let content = "src/snapshotter/content.proto";
    println!("cargo:rerun-if-changed={snapshots}");
    println!("cargo:rerun-if-changed={content}");
    let files =
        protox::compile([snapshots], ["src/snapshotter"]).expect("compiling snapshots.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(files)
        .expect("generating the snapshots service");
    let files = protox::compile([content], ["src/snapshotter"]).expect("compiling content.proto");
    tonic_prost_build::configure()
        .compile_fds(files)
        .expect("generating the content service");
}
