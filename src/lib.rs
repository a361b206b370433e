//! hoard: one daemon a BuildKit build farm shares as its cache — an OCI registry for layer cache
//! and images, backed by a verified content-addressed store and a crash-safe index.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod bench;
pub mod clock;
pub mod config;
pub mod containerd;
pub mod digest;
pub mod error;
pub mod gocache;
pub mod gomod;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod oci;
pub mod proto;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod tls;
