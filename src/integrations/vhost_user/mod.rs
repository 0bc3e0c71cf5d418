//! A vhost-user front-end (feature `vhost-user`, Linux): memtree drives a
//! back-end running in another process (QEMU's `qemu-storage-daemon`,
//! a rust-vmm `vhost-user-backend` device, ...) over the vhost-user
//! protocol, using rust-vmm's `vhost` crate for the messages.
//!
//! [`VhostUserFrontend`] is a [`MemoryListener`] at
//! [`PRIORITY_DEV_BACKEND`]: registered on an address space, it keeps the
//! back-end's memory table equal to the space's *shareable RAM* (every flat
//! range whose writes go straight to host memory): `SET_MEM_TABLE` with the
//! ranges present when it is registered, then `ADD_MEM_REG` / `REM_MEM_REG`
//! (protocol feature `CONFIGURE_MEM_SLOTS`, each acknowledged with
//! `REPLY_ACK`) as RAM is plugged and unplugged. It also negotiates
//! features and protocol features, reads the device configuration
//! (`GET_CONFIG`) and sets up vrings (num, base, addresses, kick and call
//! eventfds, enable). [`driver`] is the other side: a virtio split-queue
//! (and virtio-blk) driver over memtree guest memory, so a test or a VMM can
//! play the guest.
//!
//! # What can be shared
//!
//! A back-end maps guest RAM from a file descriptor, so only memfd-backed
//! RAM ([`crate::RamBacking::Memfd`]) can be in its table. Shareable-looking
//! RAM that has no fd is never silently left out (the back-end would read
//! garbage where the guest put data): it is refused with
//! [`VhostUserError::NotShareable`] naming the region. So is a range beyond
//! the back-end's slot limit (`GET_MAX_MEM_SLOTS`):
//! [`VhostUserError::SlotsExhausted`].
//!
//! # Errors from listener callbacks
//!
//! Listener callbacks run inside a commit, with the machine's writer lock
//! held, and cannot fail the commit. An error met in a callback is
//! recorded and returned by the next front-end call ([`VhostUserFrontend::check`]
//! and every method that talks to the back-end). Every request is bounded by
//! a timeout: a watchdog thread shuts the socket down when a reply is late,
//! so a dead or stuck back-end costs at most one timeout, never a hung
//! machine. After a timeout, a malformed or unexpected reply, or a closed
//! socket, the connection is unusable (the byte stream is out of step): the
//! front-end shuts it down, reports [`VhostUserError::Broken`] from then on,
//! and releases everything the back-end held.
//!
//! # Lifetime (the invariant)
//!
//! **Memory that the back-end has mapped stays valid until the back-end has
//! acknowledged its removal.** Each table entry holds the memory backend it
//! shares (`Arc<MemoryBackend>`, declared in the census as held by
//! "vhost-user back-end NAME"). Entries are removed in `region_del`, which a
//! commit runs before it publishes the view without the range (and at
//! unregistration and teardown): the front-end sends `REM_MEM_REG`, waits for
//! the acknowledgement, and only then drops its hold. A back-end that
//! refuses the removal keeps the memory held (and explained by the census)
//! until the connection ends. When the connection ends (closed, timed out,
//! broken, or the front-end dropped), the holds are released: the back-end
//! can no longer be asked to use the table, and its own `mmap` of the
//! memfd is kept valid by the kernel whatever memtree does with its mapping.
//!
//! Vrings must lie in memory of the table (their addresses are given to the
//! back-end as front-end virtual addresses, translated through the table).

pub mod driver;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Error as ProtoError, Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::{VhostBackend as _, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::dma::mapping::ram_backend;
use crate::host::backend::MemoryBackend;
use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};
use crate::region::region_core::Backing;
use crate::render::listener::{MemoryListener, Section, PRIORITY_DEV_BACKEND};
use crate::topology::memory::Machine;
use crate::view::flatview::FlatRange;

/// Most regions one `SET_MEM_TABLE` can carry (one fd each).
const MAX_FDS_PER_MESSAGE: usize = 8;

/// Errors of the vhost-user front-end. Cloneable: an error recorded in a
/// listener callback is kept and handed to the next caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VhostUserError {
    /// The socket could not be opened.
    #[error("cannot connect to vhost-user back-end at {path}: {message}")]
    Connect {
        /// Socket path.
        path: String,
        /// The system's reason.
        message: String,
    },
    /// The back-end lacks something this front-end needs.
    #[error("vhost-user back-end {backend} does not offer {feature}")]
    MissingFeature {
        /// Back-end name.
        backend: String,
        /// What is missing.
        feature: String,
    },
    /// The back-end answered a request with an error status.
    #[error("vhost-user back-end {backend} refused {request}")]
    Refused {
        /// Back-end name.
        backend: String,
        /// The request and its argument.
        request: String,
    },
    /// The back-end did not answer within the timeout (the connection is
    /// shut down).
    #[error("vhost-user back-end {backend} did not answer {request} within {timeout:?}")]
    Timeout {
        /// Back-end name.
        backend: String,
        /// The request.
        request: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The back-end closed the connection (it died or hung up).
    #[error("vhost-user back-end {backend} closed the connection during {request}: {message}")]
    Disconnected {
        /// Back-end name.
        backend: String,
        /// The request (or "poll" when found by [`VhostUserFrontend::check`]).
        request: String,
        /// The protocol layer's words.
        message: String,
    },
    /// The back-end sent something the protocol does not allow (a malformed
    /// or unexpected reply); the connection is shut down.
    #[error("vhost-user back-end {backend} sent a bad reply to {request}: {message}")]
    BadReply {
        /// Back-end name.
        backend: String,
        /// The request.
        request: String,
        /// The protocol layer's words.
        message: String,
    },
    /// The connection failed earlier; nothing more can be sent.
    #[error("vhost-user back-end {backend} is disconnected (because: {cause})")]
    Broken {
        /// Back-end name.
        backend: String,
        /// The failure that ended the connection.
        cause: String,
    },
    /// RAM the back-end must see cannot be shared with it.
    #[error("region {region} ({gpa:#x}+{size:#x}) cannot be shared with vhost-user back-end {backend}: {why}")]
    NotShareable {
        /// Back-end name.
        backend: String,
        /// The region's name.
        region: String,
        /// Guest-physical start of the range.
        gpa: u64,
        /// Size of the range.
        size: u64,
        /// Why.
        why: String,
    },
    /// The back-end's memory table is full.
    #[error("vhost-user back-end {backend} has {max} memory slots, all in use: cannot add region {region} ({gpa:#x}+{size:#x})")]
    SlotsExhausted {
        /// Back-end name.
        backend: String,
        /// The back-end's limit.
        max: u64,
        /// The region that did not fit.
        region: String,
        /// Guest-physical start of the range.
        gpa: u64,
        /// Size of the range.
        size: u64,
    },
    /// A caller's argument is unusable (named in the message).
    #[error("{0}")]
    Invalid(String),
}

/// How to talk to a back-end.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Virtio feature bits the driver wants; the front-end acks their
    /// intersection with the back-end's (plus `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub virtio_features: u64,
    /// Most time any one request may take (reply included).
    pub timeout: Duration,
    /// Number of queues the device is driven with.
    pub queues: u16,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            virtio_features: 1 << 32, // VIRTIO_F_VERSION_1
            timeout: Duration::from_secs(5),
            queues: 1,
        }
    }
}

/// One region of the back-end's memory table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the range in its memfd.
    pub fd_offset: u64,
    /// The region that serves the range.
    pub region: String,
    /// Census key of the memory the entry holds.
    pub memory: ObjectKey,
}

/// Where a vring lives, in guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringAddrs {
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// Moments of a removal, for observers ([`VhostUserFrontend::set_observer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendEvent {
    /// `REM_MEM_REG` is about to be sent; the entry still holds the memory.
    Removing(TableRegion),
    /// The back-end acknowledged the removal (`acked`), or the connection
    /// failed (`!acked`); the entry's memory is released right after.
    Removed {
        /// The entry.
        region: TableRegion,
        /// Whether the back-end acknowledged.
        acked: bool,
    },
}

/// An observer of removals. It runs inside the commit (writer lock held)
/// and must not call the front-end; census queries are fine.
pub type Observer = Arc<dyn Fn(&FrontendEvent) + Send + Sync>;

struct Entry {
    info: TableRegion,
    host: u64,
    memory: Arc<MemoryBackend>,
}

impl Entry {
    fn proto(&self) -> Result<VhostUserMemoryRegionInfo, String> {
        let fd = self
            .memory
            .block()
            .fd()
            .ok_or_else(|| "its memory has no file descriptor".to_owned())?;
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: self.info.gpa,
            memory_size: self.info.size,
            userspace_addr: self.host,
            mmap_offset: self.info.fd_offset,
            mmap_handle: fd.as_raw_fd(),
        })
    }
}

#[derive(Default)]
struct Table {
    /// By guest-physical start (what `region_del` names).
    live: BTreeMap<u64, Entry>,
    /// Entries the back-end refused to remove: it may still map them.
    stuck: Vec<Entry>,
    /// Ranges seen before the first `SET_MEM_TABLE` (registration replay).
    staged: Vec<Entry>,
    /// `SET_MEM_TABLE` has been sent (or nothing was there to send).
    established: bool,
    /// The census entry while the back-end holds memory.
    census_key: Option<ObjectKey>,
    /// The memory the census entry is declared to hold.
    census_holds: BTreeSet<ObjectKey>,
}

struct Conn {
    frontend: Frontend,
    /// Set once the connection failed; everything after is refused.
    broken: Option<String>,
}

/// Shuts the socket down when a request outlives its deadline.
struct Watchdog {
    state: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

impl Watchdog {
    fn run(self: Arc<Self>, sock: UnixStream) {
        let mut st = self.state.lock();
        loop {
            if st.stop {
                return;
            }
            match st.deadline {
                None => self.cv.wait(&mut st),
                Some(d) if Instant::now() >= d => {
                    st.fired = true;
                    st.deadline = None;
                    // Wakes the blocked send/recv with EOF or EPIPE.
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                Some(d) => {
                    let _ = self.cv.wait_until(&mut st, d);
                }
            }
        }
    }

    fn arm(&self, timeout: Duration) {
        let mut st = self.state.lock();
        st.deadline = Some(Instant::now() + timeout);
        self.cv.notify_one();
    }

    /// Disarms; true if the deadline passed (the socket is shut down).
    fn disarm(&self) -> bool {
        let mut st = self.state.lock();
        st.deadline = None;
        st.fired
    }

    fn stop(&self) {
        let mut st = self.state.lock();
        st.stop = true;
        self.cv.notify_one();
    }
}

/// A vhost-user front-end; see the [module docs](self).
pub struct VhostUserFrontend {
    name: String,
    census: Arc<Census>,
    timeout: Duration,
    /// A second handle on the socket, to shut it down.
    sock: UnixStream,
    watchdog: Arc<Watchdog>,
    /// Lock order: `table` before `conn`.
    table: Mutex<Table>,
    conn: Mutex<Conn>,
    /// Errors met in listener callbacks, for the next caller.
    recorded: Mutex<Vec<VhostUserError>>,
    observer: Mutex<Option<Observer>>,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    max_mem_slots: u64,
    queues: u16,
}

impl std::fmt::Debug for VhostUserFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFrontend")
            .field("name", &self.name)
            .field("table", &self.table())
            .finish()
    }
}

/// What the protocol layer's error means for the connection.
fn classify(
    backend: &str,
    request: &str,
    e: &vhost::Error,
    timed_out: bool,
    timeout: Duration,
) -> VhostUserError {
    let (backend, request) = (backend.to_owned(), request.to_owned());
    if timed_out {
        return VhostUserError::Timeout {
            backend,
            request,
            timeout,
        };
    }
    match e {
        vhost::Error::VhostUserProtocol(p) => match p {
            ProtoError::BackendInternalError => VhostUserError::Refused { backend, request },
            // Checked before anything is sent: the stream is still in step.
            ProtoError::InvalidParam
            | ProtoError::InactiveFeature(_)
            | ProtoError::InactiveOperation(_) => VhostUserError::Invalid(format!(
                "{request} to vhost-user back-end {backend} not sent: {p}"
            )),
            ProtoError::Disconnected
            | ProtoError::PartialMessage
            | ProtoError::SocketBroken(_)
            | ProtoError::SocketError(_) => VhostUserError::Disconnected {
                backend,
                request,
                message: p.to_string(),
            },
            other => VhostUserError::BadReply {
                backend,
                request,
                message: other.to_string(),
            },
        },
        other => VhostUserError::BadReply {
            backend,
            request,
            message: other.to_string(),
        },
    }
}

impl VhostUserFrontend {
    /// Connects to the back-end listening at `path` (retrying briefly while
    /// it starts) and negotiates; see [`VhostUserFrontend::from_stream`].
    pub fn connect(
        machine: &Machine,
        path: &Path,
        name: &str,
        options: FrontendOptions,
    ) -> Result<Arc<VhostUserFrontend>, VhostUserError> {
        let deadline = Instant::now() + options.timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                // The back-end may not be listening yet.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(VhostUserError::Connect {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
                }
            }
        };
        Self::from_stream(machine, stream, name, options)
    }

    /// Takes a connected socket and negotiates: `SET_OWNER`, features
    /// (`GET_FEATURES`, `SET_FEATURES`), protocol features (`REPLY_ACK` and
    /// `CONFIGURE_MEM_SLOTS` required; `CONFIG` and `MQ` used when offered)
    /// and `GET_MAX_MEM_SLOTS`. `name` names the back-end in errors and in
    /// the census. Register the result as a listener
    /// ([`Machine::register_listener`]) to share memory with the back-end.
    pub fn from_stream(
        machine: &Machine,
        stream: UnixStream,
        name: &str,
        options: FrontendOptions,
    ) -> Result<Arc<VhostUserFrontend>, VhostUserError> {
        if options.queues == 0 {
            return Err(VhostUserError::Invalid(
                "a device needs at least one queue".into(),
            ));
        }
        let clone = || {
            stream.try_clone().map_err(|e| VhostUserError::Connect {
                path: name.to_owned(),
                message: format!("cannot duplicate the socket: {e}"),
            })
        };
        let (sock, watch_sock) = (clone()?, clone()?);
        let watchdog = Arc::new(Watchdog {
            state: Mutex::new(WatchState::default()),
            cv: Condvar::new(),
        });
        {
            let w = watchdog.clone();
            std::thread::Builder::new()
                .name(format!("vhost-user-watchdog {name}"))
                .spawn(move || w.run(watch_sock))
                .map_err(|e| VhostUserError::Connect {
                    path: name.to_owned(),
                    message: format!("cannot start the watchdog thread: {e}"),
                })?;
        }
        let mut fe = VhostUserFrontend {
            name: name.to_owned(),
            census: machine.census().clone(),
            timeout: options.timeout,
            sock,
            watchdog,
            table: Mutex::new(Table::default()),
            conn: Mutex::new(Conn {
                frontend: Frontend::from_stream(stream, u64::from(options.queues)),
                broken: None,
            }),
            recorded: Mutex::new(Vec::new()),
            observer: Mutex::new(None),
            acked_features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
            max_mem_slots: 0,
            queues: options.queues,
        };
        // On failure `fe` drops: the watchdog stops, the socket closes.
        fe.negotiate(&options)?;
        Ok(Arc::new(fe))
    }

    fn negotiate(&mut self, options: &FrontendOptions) -> Result<(), VhostUserError> {
        let want_proto = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ;
        self.request("SET_OWNER", |f| f.set_owner())?;
        let offered = self.request("GET_FEATURES", |f| f.get_features())?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & proto_bit == 0 {
            return Err(self.missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered_proto = self.request("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        for (bit, what) in [
            (VhostUserProtocolFeatures::REPLY_ACK, "REPLY_ACK"),
            (
                VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                "CONFIGURE_MEM_SLOTS",
            ),
        ] {
            if !offered_proto.contains(bit) {
                return Err(self.missing(what));
            }
        }
        let proto = offered_proto & want_proto;
        self.request("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(proto))?;
        self.protocol_features = proto;
        // From here on every request asks for an acknowledgement.
        self.conn
            .lock()
            .frontend
            .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let acked = (offered & options.virtio_features) | proto_bit;
        self.request("SET_FEATURES", |f| f.set_features(acked))?;
        self.acked_features = acked;
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let n = self.request("GET_QUEUE_NUM", |f| f.get_queue_num())?;
            if n < u64::from(options.queues) {
                return Err(VhostUserError::MissingFeature {
                    backend: self.name.clone(),
                    feature: format!("{} queues (it has {n})", options.queues),
                });
            }
        } else if options.queues > 1 {
            return Err(self.missing("MQ (more than one queue)"));
        }
        self.max_mem_slots = self.request("GET_MAX_MEM_SLOTS", |f| f.get_max_mem_slots())?;
        Ok(())
    }

    fn missing(&self, what: &str) -> VhostUserError {
        VhostUserError::MissingFeature {
            backend: self.name.clone(),
            feature: what.to_owned(),
        }
    }

    /// Runs one protocol exchange under the table and connection locks and
    /// the watchdog. A failure other than a refusal or a locally refused
    /// argument ends the connection and releases what the back-end held.
    /// Callers already holding the table lock use [`Self::request_locked`].
    fn request<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        let mut table = self.table.lock();
        self.request_locked(&mut table, what, f)
    }

    fn request_locked<T>(
        &self,
        table: &mut Table,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        let mut conn = self.conn.lock();
        if let Some(cause) = &conn.broken {
            return Err(VhostUserError::Broken {
                backend: self.name.clone(),
                cause: cause.clone(),
            });
        }
        self.watchdog.arm(self.timeout);
        let out = f(&mut conn.frontend);
        let timed_out = self.watchdog.disarm();
        match out {
            Ok(v) if !timed_out => Ok(v),
            Ok(_) => {
                // Answered, but the watchdog shut the socket meanwhile.
                let e = VhostUserError::Timeout {
                    backend: self.name.clone(),
                    request: what.to_owned(),
                    timeout: self.timeout,
                };
                self.break_connection(&mut conn, table, &e);
                Err(e)
            }
            Err(err) => {
                let e = classify(&self.name, what, &err, timed_out, self.timeout);
                if !matches!(
                    e,
                    VhostUserError::Refused { .. } | VhostUserError::Invalid(_)
                ) {
                    self.break_connection(&mut conn, table, &e);
                }
                Err(e)
            }
        }
    }

    /// Ends the connection after `cause` and releases every hold.
    fn break_connection(&self, conn: &mut Conn, table: &mut Table, cause: &VhostUserError) {
        if conn.broken.is_none() {
            conn.broken = Some(cause.to_string());
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let released: Vec<Entry> = std::mem::take(&mut table.live)
            .into_values()
            .chain(table.stuck.drain(..))
            .chain(table.staged.drain(..))
            .collect();
        self.update_census(table);
        drop(released);
    }

    /// Keeps the census entry in step with what the table holds: present
    /// (holding each entry's memory) while the table holds anything.
    fn update_census(&self, table: &mut Table) {
        let held: BTreeSet<ObjectKey> = table
            .live
            .values()
            .chain(table.stuck.iter())
            .map(|e| e.memory.census_key())
            .collect();
        match table.census_key {
            None if held.is_empty() => {}
            Some(k) if held.is_empty() => {
                self.census.finalize(k);
                table.census_key = None;
            }
            None => {
                table.census_key = Some(self.census.register_holding(
                    ObjectKind::VhostUser,
                    &self.name,
                    held.iter().copied(),
                ));
            }
            Some(k) => {
                for gone in table.census_holds.difference(&held) {
                    self.census.remove_edge(k, *gone);
                }
                for new in held.difference(&table.census_holds) {
                    self.census.add_edge(k, *new);
                }
            }
        }
        table.census_holds = held;
    }

    fn record(&self, e: VhostUserError) {
        self.recorded.lock().push(e);
    }

    /// Returns the first error recorded since the last call (in a listener
    /// callback: a region that could not be shared, a full table, a failed
    /// add or removal), or the connection's failure; also notices a back-end
    /// that hung up since the last request.
    pub fn check(&self) -> Result<(), VhostUserError> {
        {
            let mut rec = self.recorded.lock();
            if !rec.is_empty() {
                return Err(rec.remove(0));
            }
        }
        let mut table = self.table.lock();
        let mut conn = self.conn.lock();
        if let Some(cause) = &conn.broken {
            return Err(VhostUserError::Broken {
                backend: self.name.clone(),
                cause: cause.clone(),
            });
        }
        if peer_hung_up(&self.sock) {
            let e = VhostUserError::Disconnected {
                backend: self.name.clone(),
                request: "poll".into(),
                message: "the socket was closed by the back-end".into(),
            };
            self.break_connection(&mut conn, &mut table, &e);
            return Err(e);
        }
        Ok(())
    }

    /// The back-end's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the connection is still usable.
    pub fn is_connected(&self) -> bool {
        self.conn.lock().broken.is_none()
    }

    /// The virtio features acked to the back-end.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The back-end's memory slot limit.
    pub fn max_mem_slots(&self) -> u64 {
        self.max_mem_slots
    }

    /// The back-end's memory table, in guest-physical order.
    pub fn table(&self) -> Vec<TableRegion> {
        self.table
            .lock()
            .live
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    /// Entries the back-end refused to remove (still held).
    pub fn stuck(&self) -> Vec<TableRegion> {
        self.table
            .lock()
            .stuck
            .iter()
            .map(|e| e.info.clone())
            .collect()
    }

    /// The census key of the front-end's entry, while it holds memory.
    pub fn census_key(&self) -> Option<ObjectKey> {
        self.table.lock().census_key
    }

    /// Installs the removal observer (see [`FrontendEvent`]).
    pub fn set_observer(&self, observer: Option<Observer>) {
        *self.observer.lock() = observer;
    }

    fn notify(&self, event: FrontendEvent) {
        let obs = self.observer.lock().clone();
        if let Some(o) = obs {
            o(&event);
        }
    }

    /// Reads `len` bytes of the device configuration at `offset`
    /// (`GET_CONFIG`; needs the `CONFIG` protocol feature).
    pub fn get_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, VhostUserError> {
        self.check()?;
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(self.missing("CONFIG"));
        }
        // The protocol's config window is 4 KiB; check before allocating.
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > 0x1000) {
            return Err(VhostUserError::Invalid(format!(
                "GET_CONFIG of {len:#x} bytes at {offset:#x} is outside the 4 KiB configuration window"
            )));
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self.request("GET_CONFIG", |f| {
            f.get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
        })?;
        Ok(payload)
    }

    /// Sets up and enables vring `index`: `SET_VRING_NUM`, `SET_VRING_BASE`
    /// (0), `SET_VRING_ADDR` (translated through the memory table: the
    /// rings must lie in shared RAM), `SET_VRING_KICK`, `SET_VRING_CALL`,
    /// `SET_VRING_ENABLE`.
    pub fn setup_vring(
        &self,
        index: u16,
        addrs: &VringAddrs,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VhostUserError> {
        self.check()?;
        if index >= self.queues {
            return Err(VhostUserError::Invalid(format!(
                "vring {index} out of range: the device is driven with {} queue(s)",
                self.queues
            )));
        }
        if !addrs.size.is_power_of_two() {
            return Err(VhostUserError::Invalid(format!(
                "vring size {} is not a power of two",
                addrs.size
            )));
        }
        let n = u64::from(addrs.size);
        let desc = self.host_of(addrs.desc, 16 * n, "descriptor table")?;
        let avail = self.host_of(addrs.avail, 6 + 2 * n, "available ring")?;
        let used = self.host_of(addrs.used, 6 + 8 * n, "used ring")?;
        let i = usize::from(index);
        let config = VringConfigData {
            queue_max_size: addrs.size,
            queue_size: addrs.size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        self.request("SET_VRING_NUM", |f| f.set_vring_num(i, addrs.size))?;
        self.request("SET_VRING_BASE", |f| f.set_vring_base(i, 0))?;
        self.request("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
        self.request("SET_VRING_KICK", |f| f.set_vring_kick(i, kick))?;
        self.request("SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
        self.request("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
        Ok(())
    }

    /// Stops vring `index` (`GET_VRING_BASE`), returning the next available
    /// index the back-end would have processed.
    pub fn stop_vring(&self, index: u16) -> Result<u32, VhostUserError> {
        self.check()?;
        let i = usize::from(index);
        self.request("GET_VRING_BASE", |f| f.get_vring_base(i))
    }

    /// The front-end virtual address of `[gpa, gpa + len)`, which must lie
    /// inside one table entry.
    fn host_of(&self, gpa: u64, len: u64, what: &str) -> Result<u64, VhostUserError> {
        let table = self.table.lock();
        let hit = table.live.range(..=gpa).next_back().map(|(_, e)| e);
        match hit {
            Some(e)
                if gpa - e.info.gpa <= e.info.size && len <= e.info.size - (gpa - e.info.gpa) =>
            {
                Ok(e.host + (gpa - e.info.gpa))
            }
            _ => Err(VhostUserError::Invalid(format!(
                "{what} at {gpa:#x}+{len:#x} is not in memory shared with vhost-user back-end {}",
                self.name
            ))),
        }
    }

    /// The table entry a flat range becomes, or `None` for ranges the
    /// back-end does not see (MMIO, ROM, ...).
    fn entry_for(&self, r: &FlatRange) -> Option<Result<Entry, VhostUserError>> {
        if !r.is_direct_write() {
            return None;
        }
        let memory = ram_backend(r.region())?.clone();
        let region = r.region().name().to_owned();
        let gpa = r.start();
        let not_shareable = |size: u64, why: &str| VhostUserError::NotShareable {
            backend: self.name.clone(),
            region: region.clone(),
            gpa,
            size,
            why: why.to_owned(),
        };
        let Ok(size) = u64::try_from(r.len()) else {
            return Some(Err(not_shareable(
                u64::MAX,
                "it spans the whole 64-bit space",
            )));
        };
        if memory.block().fd().is_none() {
            return Some(Err(not_shareable(
                size,
                "its memory is anonymous, not a memfd (create it with RamBacking::Memfd)",
            )));
        }
        let base = match r.region().backing() {
            Backing::Ram { offset, .. } | Backing::RamDevice { offset, .. } => *offset,
            _ => 0,
        };
        let fd_offset = base + r.offset_in_region();
        let host = r.host_at(gpa) as u64;
        Some(Ok(Entry {
            info: TableRegion {
                gpa,
                size,
                fd_offset,
                region,
                memory: memory.census_key(),
            },
            host,
            memory,
        }))
    }

    /// Adds an entry with `ADD_MEM_REG`, within the slot limit.
    fn add_entry(&self, table: &mut Table, entry: Entry) {
        if table.live.len() + table.stuck.len() >= self.max_mem_slots as usize {
            self.record(VhostUserError::SlotsExhausted {
                backend: self.name.clone(),
                max: self.max_mem_slots,
                region: entry.info.region.clone(),
                gpa: entry.info.gpa,
                size: entry.info.size,
            });
            return;
        }
        let proto = match entry.proto() {
            Ok(p) => p,
            Err(why) => {
                self.record(VhostUserError::Invalid(why));
                return;
            }
        };
        let what = format!(
            "ADD_MEM_REG {} {:#x}+{:#x}",
            entry.info.region, entry.info.gpa, entry.info.size
        );
        match self.request_locked(table, &what, |f| f.add_mem_region(&proto)) {
            Ok(_) => {
                table.live.insert(entry.info.gpa, entry);
                self.update_census(table);
            }
            Err(e) => self.record(e),
        }
    }

    /// Sends the first table (`SET_MEM_TABLE`, up to 8 regions; the rest
    /// with `ADD_MEM_REG`).
    fn establish(&self, table: &mut Table) {
        table.established = true;
        let mut staged = std::mem::take(&mut table.staged);
        if staged.is_empty() {
            return;
        }
        let max = usize::try_from(self.max_mem_slots).unwrap_or(usize::MAX);
        let rest = if staged.len() > max {
            staged.split_off(max)
        } else {
            Vec::new()
        };
        let first_n = staged.len().min(MAX_FDS_PER_MESSAGE);
        let later = staged.split_off(first_n);
        let protos: Vec<VhostUserMemoryRegionInfo> =
            staged.iter().filter_map(|e| e.proto().ok()).collect();
        match self.request_locked(table, "SET_MEM_TABLE", |f| f.set_mem_table(&protos)) {
            Ok(_) => {
                for e in staged {
                    table.live.insert(e.info.gpa, e);
                }
                self.update_census(table);
            }
            Err(e) => {
                self.record(e);
                return;
            }
        }
        for e in later.into_iter().chain(rest) {
            self.add_entry(table, e);
        }
    }
}

/// Whether the peer closed its end (a non-blocking poll).
fn peer_hung_up(sock: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; the fd
    // is owned by `sock`, which outlives it.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl MemoryListener for VhostUserFrontend {
    fn priority(&self) -> u32 {
        PRIORITY_DEV_BACKEND
    }

    fn name(&self) -> &str {
        "vhost-user"
    }

    fn region_add(&self, section: &Section<'_>) {
        let entry = match self.entry_for(section.range) {
            None => return,
            Some(Err(e)) => return self.record(e),
            Some(Ok(e)) => e,
        };
        let mut table = self.table.lock();
        if self.conn.lock().broken.is_some() {
            // The failure is recorded; nothing can be added any more.
            return;
        }
        if table.established {
            self.add_entry(&mut table, entry);
        } else {
            table.staged.push(entry);
        }
    }

    fn commit(&self) {
        let mut table = self.table.lock();
        if !table.established && self.conn.lock().broken.is_none() {
            self.establish(&mut table);
        }
    }

    fn region_del(&self, section: &Section<'_>) {
        let start = section.range.start();
        let info = {
            let mut table = self.table.lock();
            if let Some(i) = table.staged.iter().position(|e| e.info.gpa == start) {
                table.staged.remove(i);
                return;
            }
            match table.live.get(&start) {
                Some(e) => e.info.clone(),
                None => return,
            }
        };
        self.notify(FrontendEvent::Removing(info.clone()));
        let mut table = self.table.lock();
        let Some(entry) = table.live.remove(&start) else {
            // The connection failed meanwhile: everything is released.
            drop(table);
            self.notify(FrontendEvent::Removed {
                region: info,
                acked: false,
            });
            return;
        };
        let proto = entry.proto();
        let what = format!(
            "REM_MEM_REG {} {:#x}+{:#x}",
            info.region, info.gpa, info.size
        );
        let result = match proto {
            Ok(p) => self.request_locked(&mut table, &what, |f| f.remove_mem_region(&p)),
            Err(why) => Err(VhostUserError::Invalid(why)),
        };
        match result {
            Ok(()) => {
                drop(table);
                // The acknowledgement came: after the observer has seen it,
                // the memory may go and the census stops saying the
                // back-end holds it (also if the observer panics).
                let _release = Finally(Some(|| {
                    drop(entry);
                    self.update_census(&mut self.table.lock());
                }));
                self.notify(FrontendEvent::Removed {
                    region: info,
                    acked: true,
                });
            }
            Err(e @ VhostUserError::Refused { .. }) => {
                // The back-end may still map it: keep holding it.
                table.stuck.push(entry);
                self.update_census(&mut table);
                self.record(e);
            }
            Err(e) => {
                // The connection is gone (the rest was released by
                // `request_locked`).
                self.update_census(&mut table);
                drop(table);
                self.record(e);
                self.notify(FrontendEvent::Removed {
                    region: info,
                    acked: false,
                });
                drop(entry);
            }
        }
    }
}

impl Drop for VhostUserFrontend {
    fn drop(&mut self) {
        self.watchdog.stop();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let table = self.table.get_mut();
        table.live.clear();
        table.stuck.clear();
        table.staged.clear();
        if let Some(k) = table.census_key.take() {
            self.census.finalize(k);
        }
    }
}

/// Runs its closure when dropped, on every path out of a scope (unwinding
/// included).
struct Finally<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Finally<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
