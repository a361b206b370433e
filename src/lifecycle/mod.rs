//! What may stay and what may go: the persistent index of blobs, repositories, manifests and tags
//! (the journal makes it crash-safe and restart fast; on a bucket shared by several replicas the
//! index is a cache of the bucket, kept by `shared`).

pub mod gc;
pub mod index;
pub mod journal;
pub mod shared;
pub mod verify;
