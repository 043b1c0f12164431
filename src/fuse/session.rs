//! Making, taking over and ending a mount's FUSE connection (see the module docs above).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use fuser::InitFlags;

use super::{FuseError, MountOptions, OpenLog, StrataFs, ViewSlot, KERNEL_READAHEAD};
use crate::fs::ImageView;

/// A live mount: the session threads and a way to end them.
pub struct Mounted {
    pub mountpoint: PathBuf,
    /// Reads served so far.
    pub reads: Arc<AtomicU64>,
    /// Whether the kernel accepted FUSE passthrough (a process taking over must know).
    pub passthrough: bool,
    /// A copy of the connection's `/dev/fuse` descriptor, for a holder to keep.
    pub device: OwnedFd,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Mounts image `name` at `mountpoint` and starts serving the view of `slot` on
/// `options.threads` threads (requests wait while it opens). Backing ids are recorded in
/// `backings` when given (for a process that may take over).
pub fn mount(
    name: &str,
    slot: Arc<ViewSlot>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    options: &MountOptions,
    backings: Option<Arc<OpenLog>>,
) -> Result<Mounted, FuseError> {
    let fail = |detail: String| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        detail,
    };
    let fd: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            fail(format!(
                "cannot open /dev/fuse: {e} (is the fuse module loaded?)"
            ))
        })?
        .into();
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fd.as_raw_fd()
    );
    if options.allow_other {
        data.push_str(",allow_other");
    }
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_RDONLY | MsFlags::MS_NOATIME;
    if !options.suid {
        flags |= MsFlags::MS_NOSUID;
    }
    if !options.dev {
        flags |= MsFlags::MS_NODEV;
    }
    if !options.exec {
        flags |= MsFlags::MS_NOEXEC;
    }
    nix::mount::mount(
        Some(name),
        mountpoint,
        Some("fuse.stratafs"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| match e {
        nix::errno::Errno::EPERM => fail("mounting needs root (CAP_SYS_ADMIN)".into()),
        e => fail(format!("mount(2) failed: {e}")),
    })?;
    let device = fd.try_clone().map_err(|e| {
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        fail(format!("cannot duplicate the FUSE descriptor: {e}"))
    })?;
    let fs = StrataFs::new(slot, runtime, options.clone(), backings, HashMap::new());
    let (reads, passthrough) = (fs.reads.clone(), fs.passthrough.clone());
    let session = session(fs, fd, options).map_err(|e| {
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        fail(format!("FUSE handshake failed: {e}"))
    })?;
    start(session, mountpoint, reads, passthrough, device)
}

/// Serves the mounted connection `device` (a descriptor another process served, and a holder
/// kept): `view` must have the tree that process served, `passthrough` what the kernel
/// accepted then, and `backings` the log that process kept. The kernel's INIT is long past, so
/// `fuser` is given a copy of it; then the kernel is asked to resend the requests nobody
/// answered.
pub fn take_over(
    view: Arc<ImageView>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    device: OwnedFd,
    options: &MountOptions,
    passthrough: bool,
    backings: &Path,
) -> Result<Mounted, FuseError> {
    let fail = |detail: String| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        detail,
    };
    let inherited = OpenLog::read(backings);
    let log = OpenLog::rewrite(backings, inherited.clone())
        .map_err(|e| fail(format!("{}: {e}", backings.display())))?;
    let mut options = options.clone();
    options.passthrough = passthrough;
    let fs = StrataFs::new(
        ViewSlot::ready(view),
        runtime,
        options.clone(),
        Some(Arc::new(log)),
        inherited,
    );
    let (reads, accepted) = (fs.reads.clone(), fs.passthrough.clone());
    // fuser reads INIT from the descriptor it is given: give it a socket holding one, then
    // point that descriptor number at the real connection.
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| fail(format!("socketpair: {e}")))?;
    nix::unistd::write(&theirs, &synthetic_init(passthrough))
        .map_err(|e| fail(format!("writing INIT: {e}")))?;
    let number = ours.as_raw_fd();
    let session = session(fs, ours, &options).map_err(|e| fail(format!("handshake: {e}")))?;
    drop(theirs); // with fuser's INIT reply, unread: the kernel already has one
                  // SAFETY: `number` is the descriptor fuser's session owns; no thread uses it yet (the
                  // session runs below), so replacing the file it refers to — atomically, keeping it
                  // close-on-exec — is invisible to fuser except that it now reads the connection.
    if unsafe { libc::dup3(device.as_raw_fd(), number, libc::O_CLOEXEC) } < 0 {
        return Err(fail(format!("dup3: {}", std::io::Error::last_os_error())));
    }
    resend(&device).map_err(|source| FuseError::Resend {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })?;
    accepted.store(passthrough, Ordering::Relaxed);
    start(session, mountpoint, reads, accepted, device)
}

fn session(
    fs: StrataFs,
    fd: OwnedFd,
    options: &MountOptions,
) -> std::io::Result<fuser::Session<StrataFs>> {
    let acl = if options.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(options.threads);
    // Cloned descriptors die with this process, and the kernel aborts the requests read
    // through them: all threads read the shared one, which a holder keeps.
    config.clone_fd = false;
    config.acl = acl;
    let pages = fs.pages.clone();
    let session = fuser::Session::from_fd(fs, fd, acl, config)?;
    let _ = pages.notifier.set(session.notifier());
    Ok(session)
}

fn start(
    session: fuser::Session<StrataFs>,
    mountpoint: &Path,
    reads: Arc<AtomicU64>,
    passthrough: Arc<AtomicBool>,
    device: OwnedFd,
) -> Result<Mounted, FuseError> {
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())
        .map_err(|e| FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            detail: format!("cannot start the session: {e}"),
        })?;
    Ok(Mounted {
        mountpoint: mountpoint.to_path_buf(),
        reads,
        passthrough: passthrough.load(Ordering::Relaxed),
        device,
        thread: Some(thread),
    })
}

/// FUSE_INIT as the kernel sends it (fuse_in_header + fuse_init_in, ABI 7.41), offering what
/// `StrataFs::init` asks for; passthrough only if the kernel accepted it at the real INIT.
fn synthetic_init(passthrough: bool) -> Vec<u8> {
    let mut flags = InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_CACHE_SYMLINKS
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_MAX_PAGES
        | InitFlags::FUSE_SPLICE_READ
        | InitFlags::FUSE_INIT_EXT;
    if passthrough {
        flags |= InitFlags::FUSE_PASSTHROUGH;
    }
    let bits = flags.bits();
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_ne_bytes()); // len
    m.extend_from_slice(&26u32.to_ne_bytes()); // FUSE_INIT
    m.extend_from_slice(&1u64.to_ne_bytes()); // unique
    m.extend_from_slice(&[0; 8 + 4 + 4 + 4 + 2 + 2]); // nodeid, uid, gid, pid, extlen, pad
    m.extend_from_slice(&7u32.to_ne_bytes()); // major
    m.extend_from_slice(&41u32.to_ne_bytes()); // minor
    m.extend_from_slice(&KERNEL_READAHEAD.to_ne_bytes()); // max_readahead
    m.extend_from_slice(&(bits as u32).to_ne_bytes()); // flags
    m.extend_from_slice(&((bits >> 32) as u32).to_ne_bytes()); // flags2
    m.extend_from_slice(&[0; 44]); // unused
    m
}

/// Asks the kernel to queue again every request that was read from the connection and not
/// answered (FUSE_NOTIFY_RESEND: a fuse_out_header with the notification code as error).
fn resend(device: &OwnedFd) -> std::io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&16u32.to_ne_bytes());
    header.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    header.extend_from_slice(&0u64.to_ne_bytes());
    nix::unistd::write(device, &header)?;
    Ok(())
}

impl Mounted {
    /// Unmounts (if still mounted) and waits for the session to end.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        let result = unmount(&self.mountpoint, false);
        self.join();
        result
    }

    /// Waits for the session to end (after an unmount from elsewhere); false if it ended with
    /// an error rather than with the connection.
    pub fn join(&mut self) -> bool {
        match self.thread.take().map(|t| t.join()) {
            None | Some(Ok(Ok(()))) => true,
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "FUSE session ended with an error");
                false
            }
            Some(Err(_)) => {
                tracing::error!("FUSE session thread panicked");
                false
            }
        }
    }

    /// Whether the session has ended (unmounted from elsewhere).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// Unmounts `mountpoint`; `lazy` detaches it even while busy or dead.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), FuseError> {
    let flags = if lazy {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    match nix::mount::umount2(mountpoint, flags) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            detail: "busy: a process still uses it (close it, or unmount with --lazy)".into(),
        }),
        Err(e) => Err(FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            detail: format!("umount(2) failed: {e}"),
        }),
    }
}
