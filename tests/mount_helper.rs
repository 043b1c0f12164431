//! The mount(8) helper, for real: `mount-helper/install.sh` installs the binary under test and
//! `/sbin/mount.fuse.stratafs`, then `mount -t fuse.stratafs`, fstab lines (`mount -T FILE`) and
//! `umount` work against a real registry, and bad options or failures give mount(8)'s exit codes
//! (1: incorrect invocation or options, 32: mount failure) with a clear message.
//!
//! Needs root and /dev/fuse. Installing overwrites /usr/local/bin/stratafs and
//! /sbin/mount.fuse.stratafs (a throwaway CI machine is assumed).

mod common;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::mount::*;
use common::*;

const INSTALLED_BIN: &str = "/usr/local/bin/stratafs";
const INSTALLED_HELPER: &str = "/sbin/mount.fuse.stratafs";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `mount-helper/install.sh` with the binary under test (serialised between test processes
/// by a lock file) and checks what it installed.
fn install() {
    let lock = File::create(std::env::temp_dir().join("stratafs-mount-helper-install.lock"))
        .expect("lock file");
    lock.lock().expect("lock");
    let out = run(
        Command::new(repo_file("mount-helper/install.sh")).arg(BIN),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "install.sh: {}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(INSTALLED_BIN) && stdout.contains(INSTALLED_HELPER),
        "{stdout}"
    );
    assert!(
        std::fs::read(INSTALLED_BIN).unwrap() == std::fs::read(BIN).unwrap(),
        "{INSTALLED_BIN} is not the binary under test"
    );
    assert_eq!(
        std::fs::read(INSTALLED_HELPER).unwrap(),
        std::fs::read(repo_file("mount-helper/mount.fuse.stratafs")).unwrap()
    );
    assert_eq!(mode(INSTALLED_BIN), 0o755);
    assert_eq!(mode(INSTALLED_HELPER), 0o755);
}

/// A small image: a few text files, an executable, a symlink and a 2 MB file.
fn small_image() -> (Image, Vec<(&'static str, Vec<u8>)>) {
    let files = vec![
        ("etc/os-release", b"ID=stratafs-helper-test\n".to_vec()),
        ("etc/motd", b"mounted by mount(8)\n".to_vec()),
        ("usr/bin/tool", b"#!/bin/sh\necho tool\n".to_vec()),
        ("data/big.bin", bytes(7, 2_000_000)),
    ];
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file(files[0].0, &files[0].1, 0o644)
        .file(files[1].0, &files[1].1, 0o644)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file(files[2].0, &files[2].1, 0o755)
        .symlink("bin", "usr/bin")
        .dir("data", 0o755)
        .file(files[3].0, &files[3].1, 0o644)
        .build(Compression::Gzip);
    let image = ImageBuilder::new().layer(layer).build(ManifestFlavour::Oci);
    (image, files)
}

/// A registry with the small image, a private store and a (empty) config file.
struct Setup {
    reg: Registry,
    cli: Stratafs,
    reference: String,
    config: PathBuf,
    files: Vec<(&'static str, Vec<u8>)>,
}

fn setup(repo: &str) -> Setup {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = small_image();
    reg.push_image(repo, "v1", &image, &Auth::None);
    let reference = format!("{}/{repo}:v1", reg.addr());
    let cli = Stratafs::new();
    let config = cli.root().parent().unwrap().join("mount-config.toml");
    std::fs::write(&config, "").unwrap();
    Setup {
        reg,
        cli,
        reference,
        config,
        files,
    }
}

impl Setup {
    /// `ro,root=ROOT,config=FILE`, plus `extra`.
    fn opts(&self, extra: &str) -> String {
        let mut o = format!(
            "ro,root={},config={}",
            self.cli.root().display(),
            self.config.display()
        );
        if !extra.is_empty() {
            o = format!("{o},{extra}");
        }
        o
    }

    /// `mount` (or `umount`, ...) with the store's Docker config and no proxies; the helper
    /// finds the binary under test through `STRATAFS_BIN` (mount(8) keeps the environment).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env(
            "DOCKER_CONFIG",
            self.cli.root().parent().unwrap().join("docker"),
        )
        .env("STRATAFS_BIN", BIN);
        for var in [
            "STRATAFS_ROOT",
            "STRATAFS_CONFIG",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Every file of the image read back exactly through the mount on `dir`.
    fn check_files(&self, dir: &Path) {
        let files = self.files.clone();
        let d = dir.to_path_buf();
        let result = within(Duration::from_secs(120), move || {
            for (path, want) in &files {
                match std::fs::read(d.join(path)) {
                    Ok(got) if got == *want => {}
                    Ok(got) => return Err(format!("{path}: {} bytes, wrong content", got.len())),
                    Err(e) => return Err(format!("{path}: {e}")),
                }
            }
            Ok(())
        })
        .expect("reads through the mount hang");
        result.unwrap();
    }
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// `umount DIR` (util-linux); asserts the mount and its daemon are gone.
fn umount8(s: &Setup, dir: &Path) {
    let daemons = daemon_pids(dir);
    assert!(!daemons.is_empty(), "no daemon serves {}", dir.display());
    let out = run(s.command("umount").arg(dir), Duration::from_secs(60));
    assert!(out.status.success(), "umount: {}", show(&out));
    assert!(
        mount_at(dir).is_none(),
        "still mounted: {:?}",
        mount_at(dir)
    );
    assert!(
        wait_gone(&daemons, Duration::from_secs(10)),
        "daemon {daemons:?} still running 10 s after umount(8)"
    );
}

#[test]
fn install_sh_installs_the_binary_and_the_helper() {
    // Into a staging directory first: DESTDIR, modes, contents.
    let stage = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(repo_file("mount-helper/install.sh"))
            .arg(BIN)
            .env("DESTDIR", stage.path()),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", show(&out));
    for (path, from) in [
        ("usr/local/bin/stratafs", PathBuf::from(BIN)),
        (
            "sbin/mount.fuse.stratafs",
            repo_file("mount-helper/mount.fuse.stratafs"),
        ),
    ] {
        let p = stage.path().join(path);
        assert_eq!(mode(p.to_str().unwrap()), 0o755, "{path}");
        assert!(
            std::fs::read(&p).unwrap() == std::fs::read(&from).unwrap(),
            "{path} differs from {}",
            from.display()
        );
    }
    // A missing binary is refused with its path, and nothing is installed.
    let empty = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(repo_file("mount-helper/install.sh"))
            .arg("/nonexistent/stratafs")
            .env("DESTDIR", empty.path()),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/stratafs"),
        "{}",
        show(&out)
    );
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);

    // For real.
    install();
}

#[test]
fn mount_t_fuse_stratafs_mounts_reads_and_umount_unmounts() {
    install();
    let s = setup("helper/small");
    let guard = MountGuard::new(Some(s.cli.root()));

    // Without STRATAFS_BIN and with /usr/local/bin off PATH, the helper falls back to the
    // installed /usr/local/bin/stratafs; -v makes mount(8) pass -v on, so the helper prints
    // the command it runs.
    let out = run(
        s.command("mount")
            .env_remove("STRATAFS_BIN")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["-v", "-t", "fuse.stratafs", &s.reference])
            .arg(&guard.dir)
            .args(["-o", &s.opts("")]),
        MOUNT_TIMEOUT,
    );
    assert!(out.status.success(), "mount: {}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{INSTALLED_BIN} mount -o {}", s.opts(""))),
        "{}",
        show(&out)
    );

    let m = wait_mounted(&guard.dir, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no fuse.stratafs mount: {:?}", mount_at(&guard.dir)));
    for opt in ["ro", "nosuid", "nodev"] {
        assert!(m.has(opt), "{opt} missing: {m:?}");
    }
    let proc_mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        proc_mounts.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(1) == Some(&guard.dir.to_str().unwrap()) && f.get(2) == Some(&"fuse.stratafs")
        }),
        "{proc_mounts}"
    );
    let out = run(
        Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE,OPTIONS", "--mountpoint"])
            .arg(&guard.dir),
        Duration::from_secs(30),
    );
    let findmnt = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && findmnt.starts_with("fuse.stratafs ") && findmnt.contains("ro,"),
        "findmnt: {}",
        show(&out)
    );

    s.check_files(&guard.dir);
    let mut names: Vec<String> = std::fs::read_dir(&guard.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bin", "data", "etc", "usr"]);
    assert_eq!(
        std::fs::read_link(guard.path("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        mode(guard.path("usr/bin/tool").to_str().unwrap()) & 0o777,
        0o755
    );
    let err = std::fs::write(guard.path("etc/new"), b"x").expect_err("write to a ro mount");
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");

    umount8(&s, &guard.dir);
}

#[test]
fn an_fstab_line_mounts_with_mount_t_file() {
    install();
    let s = setup("helper/fstab");
    let guard = MountGuard::new(Some(s.cli.root()));
    let fstab = s.cli.root().parent().unwrap().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# stratafs test fstab\n{} {} fuse.stratafs {} 0 0\n",
            s.reference,
            guard.dir.display(),
            s.opts("allow_other,noauto,nofail,_netdev,x-stratafs.test=1,comment=test")
        ),
    )
    .unwrap();

    // noauto: `mount -a` leaves it alone.
    let out = run(
        s.command("mount").args(["-a", "-T"]).arg(&fstab),
        MOUNT_TIMEOUT,
    );
    assert!(out.status.success(), "mount -a: {}", show(&out));
    assert!(mount_at(&guard.dir).is_none(), "noauto line mounted by -a");

    // `mount -T FILE DIR` finds the line by its mountpoint.
    let out = run(
        s.command("mount").arg("-T").arg(&fstab).arg(&guard.dir),
        MOUNT_TIMEOUT,
    );
    assert!(out.status.success(), "mount -T: {}", show(&out));
    let m = wait_mounted(&guard.dir, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no fuse.stratafs mount: {:?}", mount_at(&guard.dir)));
    assert!(m.has("ro") && m.has("allow_other"), "{m:?}");
    s.check_files(&guard.dir);
    umount8(&s, &guard.dir);

    // `mount --fstab FILE SPEC` finds it by its source.
    let out = run(
        s.command("mount")
            .arg("--fstab")
            .arg(&fstab)
            .arg(&s.reference),
        MOUNT_TIMEOUT,
    );
    assert!(out.status.success(), "mount --fstab: {}", show(&out));
    assert!(wait_mounted(&guard.dir, Duration::from_secs(5)).is_some());
    s.check_files(&guard.dir);
    umount8(&s, &guard.dir);

    // Without noauto, `mount -a` mounts it, and a second `mount -a` sees it is mounted (the
    // mount's source is the reference) and leaves it alone.
    let auto = s.cli.root().parent().unwrap().join("fstab-auto");
    std::fs::write(
        &auto,
        format!(
            "{} {} fuse.stratafs {} 0 0\n",
            s.reference,
            guard.dir.display(),
            s.opts("nofail")
        ),
    )
    .unwrap();
    for round in 1..=2 {
        let out = run(
            s.command("mount").args(["-a", "-T"]).arg(&auto),
            MOUNT_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "mount -a (round {round}): {}",
            show(&out)
        );
        let on_dir: Vec<MountInfo> = mounts()
            .into_iter()
            .filter(|m| m.mountpoint == guard.dir)
            .collect();
        assert_eq!(on_dir.len(), 1, "round {round}: {on_dir:#?}");
        assert_eq!(on_dir[0].source, s.reference, "{on_dir:#?}");
    }
    s.check_files(&guard.dir);
    umount8(&s, &guard.dir);
}

#[test]
fn bad_options_and_failures_give_mount_exit_codes() {
    install();
    let s = setup("helper/bad");
    let guard = MountGuard::new(Some(s.cli.root()));
    let mount = |args: &[&str], opts: Option<&str>| {
        let mut cmd = s.command("mount");
        cmd.args(["-t", "fuse.stratafs"]).args(args);
        if let Some(o) = opts {
            cmd.args(["-o", o]);
        }
        run(&mut cmd, MOUNT_TIMEOUT)
    };
    let dir = guard.dir.to_str().unwrap();
    let reference = s.reference.as_str();

    // rw, explicit or implied (mount(8) passes `rw` when neither is given): usage error.
    for opts in [Some(s.opts("").replacen("ro,", "rw,", 1)), None] {
        let out = mount(&[reference, dir], opts.as_deref());
        assert_eq!(code(&out), Some(1), "{opts:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("read-only") && err.contains("'rw'"),
            "{opts:?}: {err}"
        );
    }
    // Unknown options and malformed values: usage error naming the option.
    for (bad, named) in [
        ("bogus", "'bogus'"),
        ("read_timeout=soon", "read_timeout=soon"),
        ("uid=1000", "'uid=1000'"),
    ] {
        let out = mount(&[reference, dir], Some(&s.opts(bad)));
        assert_eq!(code(&out), Some(1), "{bad}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{bad}: {err}");
    }
    assert!(mount_at(&guard.dir).is_none());

    // An image the registry does not have: mount failure, and the error names it.
    let missing = format!("{}/helper/missing:v1", s.reg.addr());
    let out = mount(&[&missing, dir], Some(&s.opts("")));
    assert_eq!(code(&out), Some(32), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("helper/missing"),
        "{}",
        show(&out)
    );
    assert!(mount_at(&guard.dir).is_none());
    assert!(
        daemon_pids(&guard.dir).is_empty(),
        "a daemon was left behind"
    );

    // A mountpoint that does not exist: mount failure.
    let nowhere = guard.dir.join("no/such/dir");
    let out = mount(&[reference, nowhere.to_str().unwrap()], Some(&s.opts("")));
    assert_eq!(code(&out), Some(32), "{}", show(&out));

    // -f (fake) -v: mount(8) passes both flags and the environment to the helper, which only
    // prints the command.
    let out = run(
        s.command("mount")
            .env("STRATAFS_BIN", "/opt/elsewhere/stratafs")
            .args(["-f", "-v", "-t", "fuse.stratafs", reference, dir, "-o"])
            .arg(s.opts("allow_other")),
        MOUNT_TIMEOUT,
    );
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "/opt/elsewhere/stratafs mount -o {} -- {reference} {dir}",
            s.opts("allow_other")
        )),
        "{}",
        show(&out)
    );
    assert!(mount_at(&guard.dir).is_none(), "-f mounted");

    // After all that, a good mount on the same directory works.
    let out = mount(&[reference, dir], Some(&s.opts("")));
    assert!(out.status.success(), "{}", show(&out));
    s.check_files(&guard.dir);

    // Mounting again on the live mount: mount failure, the first mount untouched.
    let daemons = daemon_pids(&guard.dir);
    let out = mount(&[reference, dir], Some(&s.opts("")));
    assert_eq!(code(&out), Some(32), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already mounted"),
        "{}",
        show(&out)
    );
    assert_eq!(
        mounts()
            .iter()
            .filter(|m| m.mountpoint == guard.dir)
            .count(),
        1
    );
    assert_eq!(daemon_pids(&guard.dir), daemons);
    s.check_files(&guard.dir);
    umount8(&s, &guard.dir);
}

/// The helper script on its own (no FUSE needed): argument parsing, option filtering, binary
/// discovery and exit codes.
#[test]
fn the_helper_parses_mount_arguments_and_maps_exit_codes() {
    let helper = repo_file("mount-helper/mount.fuse.stratafs");
    let tmp = tempfile::tempdir().unwrap();
    let script = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let args_log = tmp.path().join("args");
    let recorder = script(
        "record",
        &format!("printf '%s\\n' \"$@\" > {}", args_log.display()),
    );
    let helper_run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(&helper);
        cmd.args(args).env_remove("STRATAFS_BIN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd, Duration::from_secs(30))
    };
    let rec = recorder.to_str().unwrap();

    // mount(8)-only and fstab-only options are dropped; ours are passed on in order; -n is
    // accepted; the arguments reach stratafs exactly.
    let out = helper_run(
        &[("STRATAFS_BIN", rec)],
        &[
            "reg.example/app:v1",
            "/mnt/app",
            "-n",
            "-o",
            "defaults,noauto,auto,user,nouser,users,_netdev,nofail,x-systemd.automount,\
             comment=x,ro,allow_other,root=/r,config=/c,read_timeout=3,platform=linux/arm64,\
             plain_http,suid,dev,exec,noatime",
            "-t",
            "fuse.stratafs",
        ],
    );
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    assert_eq!(
        std::fs::read_to_string(&args_log).unwrap(),
        "mount\n-o\nro,allow_other,root=/r,config=/c,read_timeout=3,platform=linux/arm64,\
         plain_http,suid,dev,exec,noatime\n--\nreg.example/app:v1\n/mnt/app\n"
    );

    // -s (sloppy): unknown options are dropped with a warning instead of refused.
    let out = helper_run(
        &[("STRATAFS_BIN", rec)],
        &["a:v1", "/mnt/a", "-s", "-o", "ro,bogus"],
    );
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignoring unknown option 'bogus'"));
    assert_eq!(
        std::fs::read_to_string(&args_log).unwrap(),
        "mount\n-o\nro\n--\na:v1\n/mnt/a\n"
    );

    // -fv: print, do not run; -N wraps the command in nsenter.
    std::fs::remove_file(&args_log).unwrap();
    let out = helper_run(
        &[("STRATAFS_BIN", rec)],
        &["a:v1", "/mnt/a", "-fv", "-N", "1234", "-oro"],
    );
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "nsenter --mount=/proc/1234/ns/mnt -- {rec} mount -o ro"
        )),
        "{}",
        show(&out)
    );
    assert!(!args_log.exists(), "-f ran the command");

    // Binary discovery: PATH, then /usr/local/bin/stratafs.
    let bindir = tmp.path().join("bin");
    std::fs::create_dir(&bindir).unwrap();
    std::fs::copy(&recorder, bindir.join("stratafs")).unwrap();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bindir.display());
    let out = helper_run(&[("PATH", &path)], &["a:v1", "/mnt/a", "-fv", "-o", "ro"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("{}/stratafs mount -o ro", bindir.display())),
        "{}",
        show(&out)
    );
    let out = helper_run(
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        &["a:v1", "/mnt/a", "-fv", "-o", "ro"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/usr/local/bin/stratafs mount -o ro"),
        "{}",
        show(&out)
    );

    // Exit codes: usage errors 1, failures of stratafs 32 (its usage errors, 2, become 1).
    for (args, want) in [
        (&[][..], 1),
        (&["only-one-arg"][..], 1),
        (&["a", "b", "c"][..], 1),
        (&["a", "/mnt/a", "-o", "rw"][..], 1),
        (&["a", "/mnt/a", "-o", "ro,nonsense"][..], 1),
        (&["a", "/mnt/a", "-t", "fuse.sshfs"][..], 1),
        (&["a", "/mnt/a", "-x"][..], 1),
        (&["a", "/mnt/a", "-o"][..], 1),
    ] {
        let out = helper_run(&[("STRATAFS_BIN", rec)], args);
        assert_eq!(code(&out), Some(want), "{args:?}: {}", show(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    for (body, want) in [
        ("exit 0", 0),
        ("exit 1", 32),
        ("exit 2", 1),
        ("exit 101", 32),
    ] {
        let bin = script("fake-stratafs", body);
        let out = helper_run(
            &[("STRATAFS_BIN", bin.to_str().unwrap())],
            &["a", "/mnt/a", "-o", "ro"],
        );
        assert_eq!(code(&out), Some(want), "{body}: {}", show(&out));
    }
    let out = helper_run(
        &[("STRATAFS_BIN", "/nonexistent/stratafs")],
        &["a", "/mnt/a", "-o", "ro"],
    );
    assert_eq!(code(&out), Some(32), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/stratafs"),
        "{}",
        show(&out)
    );
}
