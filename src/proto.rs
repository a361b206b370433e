//! Code generated from proto/ at build time (build.rs): containerd's content, leases,
//! introspection and version services and hoard's admin service, messages, servers and clients. The modules
//! nest as the proto packages do (the generated code names other packages by relative path).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod introspection {
            pub mod v1 {
                tonic::include_proto!("containerd.services.introspection.v1");
            }
        }
        pub mod version {
            pub mod v1 {
                tonic::include_proto!("containerd.services.version.v1");
            }
        }
    }
}

pub mod hoard {
    pub mod v1 {
        tonic::include_proto!("hoard.v1");
    }
}

pub use containerd::services::content::v1 as content;
pub use containerd::services::introspection::v1 as introspection;
pub use containerd::services::leases::v1 as leases;
pub use containerd::services::version::v1 as version;
pub use hoard::v1 as admin;
