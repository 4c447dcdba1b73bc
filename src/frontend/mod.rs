//! leasefs's own vhost-user frontend: play VMM and guest driver over a real vhost-user socket.
//!
//! It exists so a virtio-fs backend (leasefsd, or virtiofsd for comparison) can be exercised
//! request by request without a VM: the integration tests (`tests/frontend_ops.rs`,
//! `tests/hostile_guest.rs`) and the benchmark (`leasefs-bench`) are built on it.
//!
//! Layers, bottom up:
//!
//! | module | plays | concern |
//! |---|---|---|
//! | [`memory`] | the VM | guest RAM in a memfd shared with the backend; a buffer allocator |
//! | [`virtqueue`] | the guest driver | split rings in guest memory; submit chains, kick, wait for used entries |
//! | [`connection`] | the VMM | vhost-user negotiation, memory table, vring setup, the notification queue |
//! | [`client`] | the guest's FUSE layer | typed FUSE requests and their parsed replies, plus raw requests |
//! | [`process`] | the test harness | start a daemon on a scratch share, watch its memory and exit |
//!
//! Everything is synchronous and thread safe: a [`client::FuseClient`] is bound to one
//! request queue, can be cloned onto another ([`client::FuseClient::on_queue`]), and any
//! number of threads may share a queue (each waits for its own chain).
//!
//! ```no_run
//! use std::sync::Arc;
//! use leasefs::frontend::{Device, FrontendConfig, FuseClient, ROOT_ID};
//!
//! let device = Arc::new(Device::connect("/tmp/vfsd.sock", &FrontendConfig::default()).unwrap());
//! let fuse = FuseClient::new(device);
//! fuse.init().unwrap();
//! let attr = fuse.getattr(ROOT_ID).unwrap();
//! assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFDIR);
//! ```

pub mod client;
pub mod connection;
pub mod memory;
pub mod process;
pub mod virtqueue;

pub use client::{DirEntry, DirEntryPlus, FuseClient, FuseError, Notice, RawReply, ROOT_ID};
pub use connection::{Device, FrontendConfig, Negotiated, VIRTIO_FS_F_NOTIFICATION};
pub use memory::{Buffer, GuestRam, GUEST_BASE};
pub use virtqueue::{Next, RawDescriptor, Segment, Virtqueue, WaitError};

/// Why the frontend could not set the device up.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user {step}: {source}")]
    VhostUser {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("unsupported backend: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
