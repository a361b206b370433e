//! Compiles the gRPC interfaces in proto/ (containerd's content, leases, introspection and
//! version services, hoard's admin service) without a system protoc: protox parses them, tonic's
//! generator writes the Rust code into OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/services/content/v1/content.proto",
        "proto/containerd/services/leases/v1/leases.proto",
        "proto/containerd/services/introspection/v1/introspection.proto",
        "proto/containerd/services/version/v1/version.proto",
        "proto/hoard/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".containerd.services.content.v1")
        .type_attribute(".hoard.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
