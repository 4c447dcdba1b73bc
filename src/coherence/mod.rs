//! The coherence engine: what the guest may cache, and taking it back when the host changes.
//!
//! Data flows one way: a host event source ([`watcher`]: fanotify; [`lease`]: host file leases
//! broken by a writer) reaches the lease table ([`lease`]), which decides what the guest must
//! drop and how long a host writer waits; the [`notifier`] writes the revocations into the
//! virtio-fs notification queue for guests that negotiated it. Nothing here imports the request
//! path (`fuse`, `queue`); the passthrough asks the lease table through its `LeaseKeeper` trait.

pub mod adaptive;
pub mod guest_clock;
pub mod host_lease;
pub mod lease;
pub mod notifier;
pub mod watcher;
