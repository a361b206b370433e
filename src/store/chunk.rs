//! Block-aligned, pooled buffers that carry a large upload's bytes to its I/O thread.
//!
//! `O_DIRECT` needs the memory it writes from to start on a block boundary, and the HTTP layer's
//! frames point anywhere into its own read buffer. Once an upload has its I/O thread, it copies
//! each frame into a `ChunkBuf` as it arrives (the bytes are still in the CPU's cache then) and
//! lets the frame go, so the HTTP layer reuses its read buffer instead of allocating a fresh one
//! while frames wait in queues (on a machine whose spare memory is cold, every fresh buffer costs
//! page faults). A full buffer goes to the device as it is, without a second copy, and then back to
//! the pool.

use std::sync::Mutex;

use bytes::Bytes;

/// Alignment of buffer addresses, lengths and file offsets for `O_DIRECT`: a page, which
/// covers 512-byte and 4 KiB logical blocks alike.
pub const ALIGN: usize = 4096;
/// Capacity of one buffer: large enough for the device to stream and to make hand-overs
/// between threads rare, small enough that an upload in flight holds a few MiB.
pub const CHUNK: usize = 512 << 10;
/// Buffers kept for reuse once their bytes are written (16 MiB at most stay allocated).
const POOLED: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Up to `CHUNK` bytes in a buffer whose first byte sits on an `ALIGN` boundary. Dropping it
/// (or the last `Bytes` made from it) returns the memory to the pool.
pub struct ChunkBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl ChunkBuf {
    pub fn new() -> ChunkBuf {
        let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // Zero-filled once, when first allocated; reuse writes over old bytes.
        let raw = pooled.unwrap_or_else(|| vec![0u8; CHUNK + ALIGN]);
        // `align_offset` may in principle decline to answer; an unaligned buffer is still
        // correct, it only takes the direct writer's copying path.
        let off = match raw.as_ptr().align_offset(ALIGN) {
            n if n < ALIGN => n,
            _ => 0,
        };
        ChunkBuf { raw, off, len: 0 }
    }

    /// Copies as much of `data` as fits; returns how much.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(CHUNK - self.len);
        let start = self.off + self.len;
        self.raw[start..start + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == CHUNK
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn filled(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    /// The filled bytes as shared `Bytes`; the buffer goes back to the pool when the last
    /// clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Default for ChunkBuf {
    fn default() -> ChunkBuf {
        ChunkBuf::new()
    }
}

impl AsRef<[u8]> for ChunkBuf {
    fn as_ref(&self) -> &[u8] {
        self.filled()
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        let raw = std::mem::take(&mut self.raw);
        if raw.len() == CHUNK + ALIGN {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOLED {
                pool.push(raw);
            }
        }
    }
}

/// Whether `data` starts on an `ALIGN` boundary.
pub fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr().align_offset(ALIGN) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_to_capacity_on_an_aligned_start() {
        let mut b = ChunkBuf::new();
        assert!(is_aligned(b.filled()));
        let data = vec![7u8; CHUNK + 10];
        assert_eq!(b.fill(&data[..100]), 100);
        assert_eq!(b.fill(&data), CHUNK - 100);
        assert!(b.is_full());
        assert_eq!(b.fill(&data), 0);
        let bytes = b.into_bytes();
        assert_eq!(bytes.len(), CHUNK);
        assert!(is_aligned(&bytes));
        assert!(bytes.iter().all(|&x| x == 7));
    }

    #[test]
    fn reused_buffers_carry_only_new_bytes() {
        let mut a = ChunkBuf::new();
        a.fill(&[1u8; 5000]);
        drop(a.into_bytes());
        let mut b = ChunkBuf::new();
        assert!(b.is_empty());
        b.fill(b"xyz");
        assert_eq!(b.filled(), b"xyz");
        b.clear();
        assert_eq!(b.len(), 0);
    }
}
