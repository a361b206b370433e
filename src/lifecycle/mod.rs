//! What may stay and what may go: the persistent index of blobs, repositories, manifests and tags
//! (the journal makes it crash-safe and restart fast).

pub mod gc;
pub mod index;
pub mod journal;
pub mod verify;
