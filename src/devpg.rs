//! `devpg`: a throwaway local PostgreSQL cluster.
//!
//! Used by the integration tests (which need a real PostgreSQL that the test
//! code starts itself) and by `pgsluice` when started without a config, so a
//! newcomer can `psql` through the proxy at once.
//!
//! Everything lives in a fresh directory `/tmp/pgsluice-pg-XXXXXX`:
//!
//! ```text
//! /tmp/pgsluice-pg-XXXXXX/
//!     data/               data directory (postgresql.conf, postgres.log, ...)
//!     sock/               unix_socket_directories
//!     pwfile              superuser password handed to initdb
//! ```
//!
//! PostgreSQL refuses to run as root, so when we are root every PostgreSQL
//! binary runs as the `postgres` OS user (uid/gid from `/etc/passwd`) and the
//! directory is owned by that user. Otherwise everything runs as the current
//! user.
//!
//! Cleanup does not depend on `Drop` alone (a `TempCluster` in a `static` is
//! never dropped): `start` also spawns a watchdog shell whose stdin is a pipe
//! held by the `TempCluster`. When the pipe closes — `Drop`, or our process
//! exiting for any reason, including `std::process::exit` or SIGKILL — the
//! watchdog runs `pg_ctl stop -m immediate` and removes the directory.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Host the cluster listens on (TCP).
const HOST: &str = "127.0.0.1";
/// The superuser role created by initdb.
const SUPERUSER: &str = "postgres";
/// The OS user PostgreSQL runs as when we are root.
const OS_USER: &str = "postgres";
/// How many ports to try when PostgreSQL cannot bind the one we picked.
const PORT_ATTEMPTS: u32 = 5;
/// `pg_ctl -t`: seconds pg_ctl waits for start/stop to complete.
const PG_CTL_WAIT_SECS: u32 = 60;
/// How long `start_again` keeps retrying while a previous postmaster lingers.
const START_AGAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long `Drop` waits for the watchdog.
const WATCHDOG_WAIT: Duration = Duration::from_secs(30);
/// How long `kill_postmaster` waits for the postmaster to die.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Watchdog script. `$1` = pg_ctl, `$2` = data dir, `$3` = root temp dir.
/// Blocks on stdin until EOF (our end of the pipe closed), then stops the
/// postmaster (unless it is already dead or a zombie) and removes the dir.
const WATCHDOG_SCRIPT: &str = r#"trap '' HUP INT PIPE
read -r line || :
pidfile="$2/postmaster.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile" 2>/dev/null)
  state=$(sed -n 's/.*) \([A-Za-z]\).*/\1/p' "/proc/$pid/stat" 2>/dev/null)
  if [ -n "$pid" ] && [ "$state" != Z ]; then
    "$1" stop -D "$2" -m immediate -w -t 30 >/dev/null 2>&1
  fi
fi
rm -rf "$3"
"#;

/// Errors from [`TempCluster`].
#[derive(Debug, thiserror::Error)]
pub enum DevPgError {
    /// No usable PostgreSQL installation was found.
    #[error(
        "PostgreSQL binaries not found: {0}; install PostgreSQL (Debian: `apt-get install postgresql`) \
         or set PG_BIN to the directory that holds initdb, pg_ctl, postgres and psql"
    )]
    BinariesNotFound(String),
    /// We run as root but there is no `postgres` OS user to run PostgreSQL as.
    #[error(
        "running as root, but there is no `postgres` user in /etc/passwd \
         (PostgreSQL refuses to run as root; install the postgresql package or create the user)"
    )]
    NoPostgresUser,
    /// An option in [`ClusterOptions`] cannot be used.
    #[error("invalid cluster option: {0}")]
    InvalidOption(String),
    /// A filesystem or process-spawning operation failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL command (initdb, pg_ctl, psql, kill) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// The server could not be started; includes the tail of its log.
    #[error("PostgreSQL did not start after {attempts} attempt(s); log tail:\n{log_tail}")]
    StartFailed {
        attempts: u32,
        log_tail: String,
        #[source]
        source: Box<DevPgError>,
    },
    /// `postmaster.pid` is missing or unreadable.
    #[error("cannot read postmaster pid from {path}: {reason}")]
    PidFile { path: PathBuf, reason: String },
    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { waited: Duration, what: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DevPgError {
    let context = context.into();
    move |source| DevPgError::Io { context, source }
}

/// Authentication method for `host` lines (TCP 127.0.0.1/32 and ::1/128) in
/// pg_hba.conf. `local` (unix socket) lines always use `trust`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAuth {
    Trust,
    ScramSha256,
    /// Password stored as an MD5 hash (password_encryption = md5), so clients
    /// really get an MD5 challenge.
    Md5,
}

impl HostAuth {
    fn hba_method(self) -> &'static str {
        match self {
            HostAuth::Trust => "trust",
            HostAuth::ScramSha256 => "scram-sha-256",
            HostAuth::Md5 => "md5",
        }
    }

    fn password_encryption(self) -> &'static str {
        match self {
            HostAuth::Md5 => "md5",
            HostAuth::Trust | HostAuth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// Shutdown mode for `pg_ctl stop/restart -m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Smart,
    Fast,
    Immediate,
}

impl StopMode {
    fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Options for [`TempCluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Method for TCP (`host`) connections.
    pub host_auth: HostAuth,
    /// Password of the superuser role `postgres`. Empty: no password is set.
    pub superuser_password: String,
    pub max_connections: u32,
    /// `(name, value)` settings appended to postgresql.conf after ours (so
    /// they override them). The value is written as a quoted, escaped string
    /// literal: pass it raw, e.g. `("work_mem", "8MB")`.
    pub extra_conf: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            host_auth: HostAuth::ScramSha256,
            superuser_password: "postgres".to_owned(),
            max_connections: 200,
            extra_conf: Vec::new(),
        }
    }
}

/// A throwaway PostgreSQL cluster; stopped and removed on drop (and by a
/// watchdog process when our process exits without dropping it).
pub struct TempCluster {
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    /// `Some((uid, gid))` of the `postgres` OS user when we are root.
    run_as: Option<(u32, u32)>,
    port: u16,
    password: String,
    watchdog: Option<Child>,
}

impl fmt::Debug for TempCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempCluster")
            .field("root", &self.root)
            .field("bin_dir", &self.bin_dir)
            .field("run_as", &self.run_as)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TempCluster {
    /// initdb a fresh cluster in a new temp dir and start it on a free
    /// loopback port; returns once it accepts connections.
    pub fn start(opts: ClusterOptions) -> Result<TempCluster, DevPgError> {
        validate_options(&opts)?;
        let bin_dir = find_bin_dir()?;
        let root = create_temp_dir()?;
        let mut cluster = TempCluster {
            data_dir: root.join("data"),
            socket_dir: root.join("sock"),
            log_file: root.join("data").join("postgres.log"),
            root,
            bin_dir,
            run_as: None,
            port: 0,
            password: opts.superuser_password.clone(),
            watchdog: None,
        };
        // From here on, an error drops `cluster`, which cleans up.
        cluster.init(&opts)?;
        Ok(cluster)
    }

    fn init(&mut self, opts: &ClusterOptions) -> Result<(), DevPgError> {
        let root_meta = fs::metadata(&self.root).map_err(io_err(format!("stat {}", self.root.display())))?;
        // The owner of a directory we just created is our effective uid.
        if std::os::unix::fs::MetadataExt::uid(&root_meta) == 0 {
            self.run_as = Some(lookup_os_user(OS_USER)?.ok_or(DevPgError::NoPostgresUser)?);
        }
        self.chown(&self.root)?;
        self.spawn_watchdog()?;

        fs::create_dir(&self.socket_dir).map_err(io_err(format!("create {}", self.socket_dir.display())))?;
        self.chown(&self.socket_dir)?;

        let mut initdb = self.pg_command("initdb");
        initdb
            .arg("-D")
            .arg(&self.data_dir)
            .arg("--auth-local=trust")
            .arg(format!("--auth-host={}", opts.host_auth.hba_method()))
            .arg(format!("--username={SUPERUSER}"))
            .args(["-E", "UTF8", "--locale=C", "--no-sync"]);
        if !opts.superuser_password.is_empty() {
            let pwfile = self.root.join("pwfile");
            write_file(&pwfile, &format!("{}\n", opts.superuser_password))?;
            fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("chmod {}", pwfile.display())))?;
            self.chown(&pwfile)?;
            initdb.arg(format!("--pwfile={}", pwfile.display()));
        }
        run_checked(initdb, "initdb")?;
        // The password is in the catalog now; do not leave it lying around.
        let _ = fs::remove_file(self.root.join("pwfile"));

        let conf_path = self.data_dir.join("postgresql.conf");
        let base_conf =
            fs::read_to_string(&conf_path).map_err(io_err(format!("read {}", conf_path.display())))?;
        let method = opts.host_auth.hba_method();
        let hba = format!(
            "# written by pgsluice devpg\n\
             local all         all                trust\n\
             host  all         all 127.0.0.1/32   {method}\n\
             host  all         all ::1/128        {method}\n\
             local replication all                trust\n\
             host  replication all 127.0.0.1/32   {method}\n\
             host  replication all ::1/128        {method}\n"
        );
        write_file(&self.data_dir.join("pg_hba.conf"), &hba)?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = pick_free_port()?;
            write_file(&conf_path, &format!("{base_conf}{}", self.conf_block(opts)))?;
            let log_offset = fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0);
            match self.pg_ctl_start() {
                Ok(()) => break,
                Err(e) => {
                    let new_log = read_log_from(&self.log_file, log_offset);
                    let bind_failed = new_log.contains("Address already in use")
                        || new_log.contains("could not bind")
                        || new_log.contains("could not create any TCP/IP sockets");
                    if !bind_failed || attempt >= PORT_ATTEMPTS {
                        return Err(DevPgError::StartFailed {
                            attempts: attempt,
                            log_tail: self.log_tail(),
                            source: Box::new(e),
                        });
                    }
                }
            }
        }

        if opts.host_auth == HostAuth::Md5 && !opts.superuser_password.is_empty() {
            // initdb hashed the password with its default (scram-sha-256);
            // a SCRAM secret makes the server use SCRAM even for `md5` lines.
            // Re-set it now that password_encryption = md5 is in effect.
            self.psql(
                "postgres",
                &format!(
                    "ALTER ROLE {SUPERUSER} PASSWORD {}",
                    sql_literal(&opts.superuser_password)
                ),
            )?;
        }
        Ok(())
    }

    fn conf_block(&self, opts: &ClusterOptions) -> String {
        let mut s = String::from("\n# ---- written by pgsluice devpg ----\n");
        let mut set = |name: &str, value: &str| {
            s.push_str(&format!("{name} = {}\n", conf_literal(value)));
        };
        set("listen_addresses", HOST);
        set("port", &self.port.to_string());
        set("unix_socket_directories", &self.socket_dir.to_string_lossy());
        set("max_connections", &opts.max_connections.to_string());
        set("fsync", "off");
        set("synchronous_commit", "off");
        set("full_page_writes", "off");
        set("shared_buffers", "128MB");
        set("logging_collector", "off");
        set("password_encryption", opts.host_auth.password_encryption());
        for (name, value) in &opts.extra_conf {
            set(name, value);
        }
        s
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The unix socket directory (`unix_socket_directories`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The data directory; the server log is `postgres.log` inside it.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `"postgres"`.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// Runs `sql` with psql over the unix socket as `postgres`
    /// (`-X -A -t -q -v ON_ERROR_STOP=1`, SQL fed on stdin so several
    /// statements, including CREATE DATABASE, may be given). Returns stdout
    /// trimmed; on failure the error carries psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, DevPgError> {
        let mut cmd = self.pg_command("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", db, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io_err("spawn psql"))?;
        let writer = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_owned();
            // Separate thread: psql may block writing output while we write input.
            thread::spawn(move || stdin.write_all(sql.as_bytes()))
        });
        let out = child.wait_with_output().map_err(io_err("wait for psql"))?;
        if let Some(writer) = writer {
            // A write error (broken pipe) only matters if psql also failed,
            // and then its stderr says why.
            let _ = writer.join();
        }
        let out = check_output(out, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `pg_ctl stop -m <mode> -w`.
    pub fn stop(&self, mode: StopMode) -> Result<(), DevPgError> {
        self.clear_stale_pid_file();
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode.as_str(), "-w", "-t"])
            .arg(PG_CTL_WAIT_SECS.to_string());
        run_checked(cmd, "pg_ctl stop").map(drop)
    }

    /// `pg_ctl start -w` on the same data dir and port. Retries (for up to
    /// 30 s) while a previous postmaster's shared memory or backends linger.
    pub fn start_again(&self) -> Result<(), DevPgError> {
        let deadline = Instant::now() + START_AGAIN_DEADLINE;
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.clear_stale_pid_file();
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(DevPgError::StartFailed {
                        attempts,
                        log_tail: self.log_tail(),
                        source: Box::new(e),
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// `pg_ctl restart -m <mode> -w`.
    pub fn restart(&self, mode: StopMode) -> Result<(), DevPgError> {
        self.clear_stale_pid_file();
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("restart")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-m", mode.as_str(), "-w", "-t"])
            .arg(PG_CTL_WAIT_SECS.to_string());
        run_checked(cmd, "pg_ctl restart").map(drop)
    }

    /// PID of the postmaster (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Result<u32, DevPgError> {
        let path = self.data_dir.join("postmaster.pid");
        let text = fs::read_to_string(&path).map_err(|e| DevPgError::PidFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let first = text.lines().next().unwrap_or("").trim();
        first.parse().map_err(|_| DevPgError::PidFile {
            path,
            reason: format!("first line {first:?} is not a pid"),
        })
    }

    /// SIGKILL the postmaster (via the `kill` command) and wait (bounded)
    /// until it is dead. Its backends notice and exit on their own.
    pub fn kill_postmaster(&self) -> Result<(), DevPgError> {
        let pid = self.postmaster_pid()?;
        let mut cmd = Command::new("kill");
        cmd.args(["-s", "KILL", &pid.to_string()]);
        run_checked(cmd, "kill -s KILL").map(drop)?;
        let start = Instant::now();
        while process_alive(pid) {
            if start.elapsed() > KILL_WAIT {
                return Err(DevPgError::Timeout {
                    waited: KILL_WAIT,
                    what: format!("postmaster {pid} to die"),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), DevPgError> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t"])
            .arg(PG_CTL_WAIT_SECS.to_string());
        run_checked(cmd, "pg_ctl start").map(drop)
    }

    /// Is the postmaster recorded in postmaster.pid alive (not a zombie)?
    fn postmaster_alive(&self) -> bool {
        self.postmaster_pid().map(process_alive).unwrap_or(false)
    }

    /// Remove postmaster.pid if the process it names is dead or a zombie.
    ///
    /// Needed where PID 1 does not reap orphans (e.g. some containers): a
    /// killed postmaster stays a zombie, `kill(pid, 0)` succeeds on it, and
    /// both pg_ctl and a new postmaster would think it still runs. Lingering
    /// backends are still detected through the shared memory interlock.
    fn clear_stale_pid_file(&self) {
        if let Ok(pid) = self.postmaster_pid() {
            if !process_alive(pid) {
                let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A command for a PostgreSQL binary, run as the right OS user, with a
    /// predictable environment (no PG* variables, C locale).
    fn pg_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        self.prepare(&mut cmd);
        cmd.current_dir(&self.root).env("HOME", &self.root);
        cmd
    }

    fn prepare(&self, cmd: &mut Command) {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("LC_ALL", "C").stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
    }

    fn chown(&self, path: &Path) -> Result<(), DevPgError> {
        match self.run_as {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {} to {OS_USER}", path.display()))),
            None => Ok(()),
        }
    }

    fn spawn_watchdog(&mut self) -> Result<(), DevPgError> {
        let mut cmd = Command::new("/bin/sh");
        self.prepare(&mut cmd);
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pgsluice-devpg-watchdog")
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(&self.data_dir)
            .arg(&self.root)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C aimed at us must not kill it.
            .process_group(0);
        let child = cmd.spawn().map_err(io_err("spawn devpg watchdog (/bin/sh)"))?;
        self.watchdog = Some(child);
        Ok(())
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.postmaster_alive() {
            let _ = self.stop(StopMode::Immediate);
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take()); // EOF: the watchdog cleans up and exits
            let start = Instant::now();
            loop {
                match watchdog.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if start.elapsed() > WATCHDOG_WAIT => {
                        let _ = watchdog.kill();
                        let _ = watchdog.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn validate_options(opts: &ClusterOptions) -> Result<(), DevPgError> {
    if opts.superuser_password.contains(['\n', '\r', '\0']) {
        return Err(DevPgError::InvalidOption(
            "superuser_password must not contain newlines or NUL".to_owned(),
        ));
    }
    if opts.max_connections == 0 {
        return Err(DevPgError::InvalidOption(
            "max_connections must be at least 1".to_owned(),
        ));
    }
    for (name, value) in &opts.extra_conf {
        let ok_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !ok_name {
            return Err(DevPgError::InvalidOption(format!(
                "extra_conf name {name:?} is not a setting name"
            )));
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(DevPgError::InvalidOption(format!(
                "extra_conf value for {name} must not contain newlines or NUL"
            )));
        }
    }
    Ok(())
}

/// A postgresql.conf string literal.
fn conf_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A SQL string literal (standard_conforming_strings = on).
fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `PG_BIN`, else the highest-numbered `/usr/lib/postgresql/*/bin` with
/// initdb, else the directory of `initdb` on PATH.
fn find_bin_dir() -> Result<PathBuf, DevPgError> {
    const NEEDED: [&str; 4] = ["initdb", "pg_ctl", "postgres", "psql"];
    let check = |dir: PathBuf, origin: &str| -> Result<PathBuf, DevPgError> {
        match NEEDED.iter().find(|b| !dir.join(b).is_file()) {
            None => Ok(dir),
            Some(missing) => Err(DevPgError::BinariesNotFound(format!(
                "{} (from {origin}) has no `{missing}`",
                dir.display()
            ))),
        }
    };
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        return check(PathBuf::from(dir), "PG_BIN");
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if !bin.join("initdb").is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let key: Vec<u64> = name.split('.').map(|p| p.parse().unwrap_or(0)).collect();
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return check(bin, "/usr/lib/postgresql/*/bin");
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                // Follow a symlink to the real install dir if there is one.
                let real = fs::canonicalize(&initdb)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| d.join("pg_ctl").is_file())
                    .unwrap_or(dir);
                return check(real, "PATH");
            }
        }
    }
    Err(DevPgError::BinariesNotFound(
        "PG_BIN is not set, no /usr/lib/postgresql/*/bin/initdb, and no initdb on PATH".to_owned(),
    ))
}

/// uid/gid of `user` from /etc/passwd.
fn lookup_os_user(user: &str) -> Result<Option<(u32, u32)>, DevPgError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("read /etc/passwd"))?;
    Ok(passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    }))
}

/// Create `/tmp/pgsluice-pg-XXXXXX` (mode 0700) with a random suffix.
fn create_temp_dir() -> Result<PathBuf, DevPgError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut last_err = None;
    for attempt in 0u32..100 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u32(attempt);
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            hasher.write_u128(d.as_nanos());
        }
        let mut n = hasher.finish();
        let mut suffix = String::with_capacity(6);
        for _ in 0..6 {
            // ALPHABET has 36 entries, so the index is in range.
            let idx = usize::try_from(n % 36).unwrap_or(0);
            suffix.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'x')));
            n /= 36;
        }
        let dir = PathBuf::from(format!("/tmp/pgsluice-pg-{suffix}"));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(io_err(format!("chmod {}", dir.display())))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(io_err(format!("create {}", dir.display()))(e)),
        }
    }
    Err(io_err("create a unique /tmp/pgsluice-pg-* directory")(
        last_err.unwrap_or_else(|| io::Error::other("no attempt made")),
    ))
}

/// A loopback port that was free a moment ago.
fn pick_free_port() -> Result<u16, DevPgError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("bind 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("read local address of port probe"))?
        .port();
    Ok(port)
}

/// Alive and not a zombie, per /proc/PID/stat.
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

fn write_file(path: &Path, contents: &str) -> Result<(), DevPgError> {
    fs::write(path, contents).map_err(io_err(format!("write {}", path.display())))
}

fn read_log_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(bytes.get(start..).unwrap_or_default()).into_owned()
}

fn run_checked(mut cmd: Command, what: &str) -> Result<Output, DevPgError> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("run {what} ({:?})", cmd.get_program())))?;
    check_output(out, what)
}

fn check_output(out: Output, what: &str) -> Result<Output, DevPgError> {
    if out.status.success() {
        return Ok(out);
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stderr.is_empty() || what.starts_with("pg_ctl") || what == "initdb" {
        // pg_ctl/initdb print part of their diagnosis on stdout.
        if !stdout.trim().is_empty() {
            if !stderr.is_empty() {
                stderr.push('\n');
            }
            stderr.push_str(stdout.trim());
        }
    }
    Err(DevPgError::CommandFailed {
        command: what.to_owned(),
        status: out.status.to_string(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio_postgres::error::SqlState;
    use tokio_postgres::NoTls;

    /// Connect over TCP with `password` and run `SELECT 1`.
    fn connect(cluster: &TempCluster, password: &str) -> Result<i32, tokio_postgres::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut config = tokio_postgres::Config::new();
            config
                .host(cluster.host())
                .port(cluster.port())
                .user(cluster.superuser())
                .password(password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(10));
            let (client, connection) = config.connect(NoTls).await?;
            let conn = tokio::spawn(connection);
            let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
            drop(client);
            let _ = conn.await;
            Ok(one)
        })
    }

    fn assert_wrong_password_rejected(cluster: &TempCluster) {
        let err = connect(cluster, "definitely-wrong").unwrap_err();
        assert_eq!(
            err.as_db_error().map(|e| e.code().clone()),
            Some(SqlState::INVALID_PASSWORD),
            "{err}"
        );
    }

    fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn trust_auth_psql_extra_conf_and_drop_cleanup() {
        let cluster = TempCluster::start(ClusterOptions {
            host_auth: HostAuth::Trust,
            max_connections: 20,
            extra_conf: vec![
                ("work_mem".into(), "5MB".into()),
                ("pgsluice.note".into(), "it's \\ quoted".into()),
            ],
            ..ClusterOptions::default()
        })
        .unwrap();
        assert_eq!(cluster.host(), "127.0.0.1");
        assert_eq!(cluster.superuser(), "postgres");
        assert!(cluster.data_dir().starts_with("/tmp"));
        let root = cluster.data_dir().parent().unwrap().to_path_buf();
        assert!(root
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("pgsluice-pg-"));
        assert!(cluster.socket_dir().starts_with(&root));

        // Trust: any password works over TCP.
        assert_eq!(connect(&cluster, "anything").unwrap(), 1);
        assert_eq!(cluster.psql("postgres", "show work_mem").unwrap(), "5MB");
        assert_eq!(
            cluster.psql("postgres", "show pgsluice.note").unwrap(),
            "it's \\ quoted"
        );
        assert_eq!(cluster.psql("postgres", "show max_connections").unwrap(), "20");
        assert_eq!(cluster.psql("postgres", "show fsync").unwrap(), "off");
        // Several statements, CREATE DATABASE outside a transaction, tags quiet.
        let out = cluster
            .psql(
                "postgres",
                "CREATE DATABASE other;\nCREATE ROLE r LOGIN;\nSELECT 'a', 1 UNION ALL SELECT 'b', 2 ORDER BY 1;",
            )
            .unwrap();
        assert_eq!(out, "a|1\nb|2");
        assert_eq!(
            cluster.psql("other", "select current_database()").unwrap(),
            "other"
        );
        let err = cluster
            .psql("postgres", "select * from no_such_table")
            .unwrap_err();
        assert!(err.to_string().contains("no_such_table"), "{err}");

        let pid = cluster.postmaster_pid().unwrap();
        drop(cluster);
        assert!(!root.exists(), "{} still exists after drop", root.display());
        assert!(!process_alive(pid), "postmaster {pid} survived drop");
    }

    #[test]
    fn scram_auth_restart_kill_and_start_again() {
        let cluster = TempCluster::start(ClusterOptions::default()).unwrap();
        assert_eq!(cluster.superuser_password(), "postgres");
        assert_eq!(connect(&cluster, "postgres").unwrap(), 1);
        assert_wrong_password_rejected(&cluster);
        assert_eq!(
            cluster
                .psql(
                    "postgres",
                    "select left(rolpassword, 14) from pg_authid where rolname = 'postgres'"
                )
                .unwrap(),
            "SCRAM-SHA-256$"
        );

        let pid1 = cluster.postmaster_pid().unwrap();
        // uid/gid via CommandExt (not su/runuser) keeps our descriptor limit.
        let nofile = |pid: &str| {
            fs::read_to_string(format!("/proc/{pid}/limits"))
                .unwrap()
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(nofile(&pid1.to_string()), nofile("self"));
        cluster.restart(StopMode::Fast).unwrap();
        let pid2 = cluster.postmaster_pid().unwrap();
        assert_ne!(pid1, pid2);
        assert_eq!(connect(&cluster, "postgres").unwrap(), 1);

        cluster.kill_postmaster().unwrap();
        assert!(!process_alive(pid2));
        assert!(connect(&cluster, "postgres").is_err());
        cluster.start_again().unwrap();
        assert_eq!(connect(&cluster, "postgres").unwrap(), 1);
        assert_eq!(cluster.psql("postgres", "select 40 + 2").unwrap(), "42");

        cluster.stop(StopMode::Fast).unwrap();
        assert!(connect(&cluster, "postgres").is_err());
        assert!(cluster.postmaster_pid().is_err());
        cluster.start_again().unwrap();
        assert_eq!(connect(&cluster, "postgres").unwrap(), 1);
    }

    #[test]
    fn md5_auth_stores_md5_and_checks_password() {
        let cluster = TempCluster::start(ClusterOptions {
            host_auth: HostAuth::Md5,
            superuser_password: "s3cr'et:pw".into(),
            ..ClusterOptions::default()
        })
        .unwrap();
        assert_eq!(
            cluster
                .psql(
                    "postgres",
                    "select left(rolpassword, 3) from pg_authid where rolname = 'postgres'"
                )
                .unwrap(),
            "md5"
        );
        assert_eq!(connect(&cluster, "s3cr'et:pw").unwrap(), 1);
        assert_wrong_password_rejected(&cluster);
    }

    #[test]
    fn invalid_options_are_rejected_before_anything_starts() {
        let bad = ClusterOptions {
            extra_conf: vec![("bad name".into(), "x".into())],
            ..ClusterOptions::default()
        };
        assert!(matches!(
            TempCluster::start(bad),
            Err(DevPgError::InvalidOption(_))
        ));
        assert_eq!(conf_literal("a'b\\c"), "'a''b\\\\c'");
    }

    #[test]
    fn temp_cluster_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TempCluster>();
    }

    const CHILD_ENV: &str = "DEVPG_WATCHDOG_CHILD_OUT";

    /// Helper run in a child process by `watchdog_cleans_up_when_process_exits`:
    /// starts a cluster, records where it is, and exits without dropping it.
    #[test]
    #[ignore = "helper: run by watchdog_cleans_up_when_process_exits in a child process"]
    fn watchdog_child_helper() {
        let Some(out) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let cluster = TempCluster::start(ClusterOptions {
            max_connections: 10,
            ..ClusterOptions::default()
        })
        .unwrap();
        let info = format!(
            "{}\n{}\n{}\n",
            cluster.data_dir().parent().unwrap().display(),
            cluster.postmaster_pid().unwrap(),
            cluster.port()
        );
        fs::write(out, info).unwrap();
        std::process::exit(0); // no Drop
    }

    #[test]
    fn watchdog_cleans_up_when_process_exits() {
        let info_path = std::env::temp_dir().join(format!(
            "devpg-watchdog-test-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = fs::remove_file(&info_path);
        // libtest names omit the crate: "devpg::tests::watchdog_child_helper".
        let module = module_path!().split_once("::").unwrap().1;
        let helper = format!("{module}::watchdog_child_helper");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &helper, "--ignored", "--test-threads=1"])
            .env(CHILD_ENV, &info_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("helper process did not exit");
            }
            thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "helper failed: {status}");
        let info = fs::read_to_string(&info_path).expect("helper did not record its cluster");
        let _ = fs::remove_file(&info_path);
        let mut lines = info.lines();
        let root = PathBuf::from(lines.next().unwrap());
        let pid: u32 = lines.next().unwrap().parse().unwrap();
        let port: u16 = lines.next().unwrap().parse().unwrap();
        assert!(root.starts_with("/tmp"));

        wait_until("watchdog cleanup", Duration::from_secs(60), || {
            !process_alive(pid) && !root.exists()
        });
        assert!(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }
}
