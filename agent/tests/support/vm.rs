//! The kernel-VM tier's harness: a Debian kernel with kernel WireGuard booted in QEMU (TCG, no
//! KVM needed), its virtio NIC on a tap bridged to host namespaces that run wireguard-go
//! peers, and a command channel over the serial console (`tests/vm/README.md`).
//!
//! ```text
//!   laptop ns              switch ns (br0)                 VM (QEMU, TCG)
//!   192.0.2.2/24 ──veth──┐                                  eth0 192.0.2.1/24
//!                        ├── br0 ── tap ── virtio-net ──── kernel WireGuard, wgpin-agent
//!   attacker ns          │
//!   192.0.2.3/24 ──veth──┘
//! ```
//!
//! Everything is removed on drop: QEMU is stopped (and dies with the test's thread, through
//! `setpriv --pdeathsig`, if the test process is killed), then the tap, and the namespaces.

use std::{
    io::{BufRead as _, BufReader, Read, Write as _},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    },
    time::{Duration, Instant},
};

use base64::Engine as _;

use super::{add_namespaces, delete_namespaces, require_root, run, unique_id};

/// The VM's underlay address, the laptop's and the attacker's (all in 192.0.2.0/24).
pub const VM_IP: &str = "192.0.2.1";
pub const LAPTOP_IP: &str = "192.0.2.2";
pub const ATTACKER_IP: &str = "192.0.2.3";

/// How long a boot may take before the test fails (about 3.5 s on an idle 2-core host).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The boot files `tests/vm/build-image.sh` made.
#[derive(Clone, Debug)]
pub struct VmImage {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// How long the build took in this process (well under a second when cached).
    pub build_time: Duration,
}

/// The image with this test binary's `wgpin-agent`, built once per process. `Err` only when a
/// Debian package it needs is unavailable (the reason, for the skip message); any other build
/// failure panics.
pub fn image() -> Result<VmImage, String> {
    static IMAGE: OnceLock<Result<VmImage, String>> = OnceLock::new();
    IMAGE.get_or_init(|| image_with(&[], &[])).clone()
}

/// The image, or `None` after saying loudly why this test is skipped.
pub fn image_or_skip(test: &str) -> Option<VmImage> {
    match image() {
        Ok(image) => Some(image),
        Err(reason) => {
            let message = format!(
                "SKIPPED {test}: the kernel VM image cannot be built because a Debian package is unavailable: {reason}"
            );
            // Straight to stderr: the test harness captures print! and eprint! of a passing
            // test, and a skip must never be silent.
            let _ = writeln!(std::io::stderr(), "{message}");
            None
        }
    }
}

/// The host side: a switch namespace with a bridge and the VM's tap, and the laptop's and
/// the attacker's namespaces on it.
pub struct VmNet {
    pub switch_ns: String,
    pub laptop_ns: String,
    pub attacker_ns: String,
    pub tap: String,
    pub id: String,
}

impl VmNet {
    pub fn new() -> Self {
        require_root();
        let id = unique_id();
        let net = Self {
            switch_ns: format!("wgvm-{id}-s"),
            laptop_ns: format!("wgvm-{id}-l"),
            attacker_ns: format!("wgvm-{id}-a"),
            tap: format!("wv{id}t"),
            id,
        };
        add_namespaces(&[&net.switch_ns, &net.laptop_ns, &net.attacker_ns]);
        let sw = net.switch_ns.as_str();
        run("ip", &["-n", sw, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", sw, "link", "set", "br0", "up"]);
        run(
            "ip",
            &["-n", sw, "tuntap", "add", "dev", &net.tap, "mode", "tap"],
        );
        run(
            "ip",
            &["-n", sw, "link", "set", &net.tap, "master", "br0", "up"],
        );
        for (ns, ip, end) in [
            (&net.laptop_ns, LAPTOP_IP, "l"),
            (&net.attacker_ns, ATTACKER_IP, "a"),
        ] {
            let (outer, inner) = (format!("wv{}{end}", net.id), format!("wv{}{end}p", net.id));
            run(
                "ip",
                &[
                    "-n", sw, "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                    "netns", ns,
                ],
            );
            run(
                "ip",
                &["-n", sw, "link", "set", &outer, "master", "br0", "up"],
            );
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", &inner],
            );
            run("ip", &["-n", ns, "link", "set", &inner, "up"]);
        }
        net
    }
}

impl Default for VmNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.switch_ns, "link", "del", &self.tap])
            .output();
        delete_namespaces(&[&self.switch_ns, &self.laptop_ns, &self.attacker_ns]);
    }
}

/// What a command printed and how it ended.
#[derive(Clone, Debug)]
pub struct Output {
    pub status: i32,
    pub text: String,
}

/// A booted VM and its serial console.
pub struct Vm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    console: Arc<Mutex<Vec<String>>>,
    next_id: u32,
    /// QEMU started → the guest printed `WGPIN-BOOTED` (modules loaded, eth0 up).
    pub boot_time: Duration,
    /// The guest's own uptime at that point.
    pub guest_uptime: f64,
}

fn read_lines(
    from: impl Read + Send + 'static,
    console: Arc<Mutex<Vec<String>>>,
    to: Option<Sender<String>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buffer = Vec::new();
        while reader.read_until(b'\n', &mut buffer).unwrap_or(0) > 0 {
            let line = String::from_utf8_lossy(&buffer)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            buffer.clear();
            if let Ok(mut console) = console.lock() {
                console.push(line.clone());
            }
            if let Some(to) = &to
                && to.send(line).is_err()
            {
                break;
            }
        }
    });
}

impl Vm {
    /// Boots the VM on `net`'s tap and waits for `WGPIN-BOOTED`.
    pub fn boot(net: &VmNet, image: &VmImage) -> Self {
        // nsenter and setpriv exec in turn, so QEMU is this process's child: it runs in the
        // switch namespace (where its tap is) and gets SIGKILL when the thread that started
        // it ends, even if this process is killed and no Drop runs.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", net.switch_ns))
            .args(["setpriv", "--pdeathsig", "KILL", "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-cpu", "max", "-m", "768", "-smp", "1"])
            .args(["-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.vmlinux)
            .arg("-initrd")
            .arg(&image.initrd)
            .args([
                "-append",
                &format!("console=ttyS0 quiet panic=-1 wgpin.ip={VM_IP}/24"),
                "-netdev",
                &format!("tap,id=n0,ifname={},script=no,downscript=no", net.tap),
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:00:02:01",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .expect("qemu-system-x86_64 starts (scripts/setup.sh --test installs it)");
        let console = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = channel();
        read_lines(
            child.stdout.take().expect("stdout"),
            console.clone(),
            Some(tx),
        );
        read_lines(child.stderr.take().expect("stderr"), console.clone(), None);
        let stdin = child.stdin.take().expect("stdin");
        let mut vm = Self {
            child,
            stdin,
            lines,
            console,
            next_id: 0,
            boot_time: Duration::ZERO,
            guest_uptime: 0.0,
        };
        let booted = vm.wait_for_line("WGPIN-BOOTED", BOOT_TIMEOUT);
        vm.boot_time = started.elapsed();
        vm.guest_uptime = booted
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        if let Some(error) = vm
            .console_text()
            .lines()
            .find(|l| l.contains("WGPIN-ERROR"))
        {
            panic!("the guest could not set up: {error}\n{}", vm.console_tail());
        }
        vm
    }

    /// The protocol line starting with `prefix` (anything before `WGPIN-` on the line, such as
    /// firmware output without a newline, is ignored).
    fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(prefix) {
                        return line[at..].to_string();
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no {prefix} from the VM within {timeout:?}\n{}",
                    self.console_tail()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the VM ended while waiting for {prefix}\n{}",
                    self.console_tail()
                ),
            }
        }
    }

    /// Runs a shell script in the guest (busybox sh, as root), killed after `timeout`.
    pub fn sh_timeout(&mut self, script: &str, timeout: Duration) -> Output {
        self.next_id += 1;
        let id = self.next_id;
        let encoded = base64::engine::general_purpose::STANDARD.encode(script);
        assert!(
            encoded.len() < 3500,
            "a command line must fit the guest tty's 4 KiB line buffer: write big files in parts"
        );
        let seconds = timeout.as_secs().max(1);
        writeln!(self.stdin, "{id} {seconds} {encoded}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("writing to the VM console: {e}"));
        let out_prefix = format!("WGPIN-OUT {id} ");
        let end_prefix = format!("WGPIN-END {id} ");
        let mut text = String::new();
        // The guest kills the script at `timeout`; allow for its reporting.
        let deadline = Instant::now() + timeout + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "no end of command {id} ({e:?}):\n{script}\n{}",
                    self.console_tail()
                ),
            };
            if let Some(at) = line.find(&out_prefix) {
                text.push_str(&line[at + out_prefix.len()..]);
                text.push('\n');
            } else if let Some(at) = line.find(&end_prefix) {
                let status = line[at + end_prefix.len()..].trim().parse().unwrap_or(-1);
                return Output { status, text };
            }
        }
    }

    /// Runs a script with a one-minute limit.
    pub fn sh(&mut self, script: &str) -> Output {
        self.sh_timeout(script, Duration::from_secs(60))
    }

    /// Runs a script that must succeed; returns what it printed.
    pub fn ok(&mut self, script: &str) -> String {
        let output = self.sh(script);
        assert_eq!(
            output.status, 0,
            "in the VM: {script}\nprinted:\n{}",
            output.text
        );
        output.text
    }

    /// Writes a file in the guest.
    pub fn write_file(&mut self, path: &str, contents: &str) {
        let encoded = base64::engine::general_purpose::STANDARD.encode(contents);
        self.ok(&format!("mkdir -p \"$(dirname {path})\"; : > {path}"));
        for chunk in encoded.as_bytes().chunks(2000) {
            let chunk = std::str::from_utf8(chunk).expect("base64 is ASCII");
            self.ok(&format!("echo {chunk} >> {path}.b64"));
        }
        self.ok(&format!("base64 -d {path}.b64 > {path} && rm {path}.b64"));
    }

    /// Everything the console printed so far.
    pub fn console_text(&self) -> String {
        self.console
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }

    /// The last lines of the console, for failure messages.
    pub fn console_tail(&self) -> String {
        let lines = self.console.lock().map(|l| l.clone()).unwrap_or_default();
        let start = lines.len().saturating_sub(80);
        format!(
            "--- VM console (last lines) ---\n{}",
            lines[start..].join("\n")
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let poweroff = base64::engine::general_purpose::STANDARD.encode("poweroff -f");
        let _ = writeln!(self.stdin, "0 5 {poweroff}");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent in the guest: `wgpin-agent standalone` with kernel WireGuard, manifests in
/// /etc/wgpin, metrics on 127.0.0.1:9477, the log in /run/agent.log.
pub struct GuestAgent;

impl GuestAgent {
    pub const LOG: &'static str = "/run/agent.log";
    pub const DIR: &'static str = "/etc/wgpin";

    /// Starts the agent in the background (its output appended to the log).
    pub fn start(vm: &mut Vm) {
        vm.ok(&format!(
            "wgpin-agent standalone --dir {dir} --node gateway --underlay eth0 --backend kernel \
             --metrics-addr 127.0.0.1:9477 --guard-interval-ms 200 --resync-interval-ms 500 \
             >>{log} 2>&1 &\n\
             echo $! > /run/agent.pid",
            dir = Self::DIR,
            log = Self::LOG
        ));
    }

    /// Waits until /readyz answers 200 (fast path verified, state applied); returns how long
    /// it took.
    pub fn wait_ready(vm: &mut Vm, timeout: Duration) -> Duration {
        let started = Instant::now();
        // busybox wget's -T crashes (busybox-static 1.35); `timeout` bounds each try instead.
        let polls = timeout.as_millis() / 200;
        let output = vm.sh_timeout(
            &format!(
                "for i in $(seq 1 {polls}); do\n\
                 timeout 5 wget -q -O /dev/null http://127.0.0.1:9477/readyz && exit 0\n\
                 kill -0 $(cat /run/agent.pid) || {{ echo 'the agent exited'; exit 2; }}\n\
                 sleep 0.2\n\
                 done\n\
                 exit 1"
            ),
            timeout + Duration::from_secs(10),
        );
        let log = Self::log(vm);
        assert_eq!(
            output.status, 0,
            "the agent did not become ready within {timeout:?}: {}\n{log}",
            output.text
        );
        started.elapsed()
    }

    /// `kill -9` of the agent.
    pub fn kill_9(vm: &mut Vm) {
        vm.ok("kill -9 $(cat /run/agent.pid)");
    }

    pub fn log(vm: &mut Vm) -> String {
        vm.sh(&format!("cat {}", Self::LOG)).text
    }

    /// The agent's metrics.
    pub fn metrics(vm: &mut Vm) -> String {
        vm.ok("timeout 10 wget -q -O - http://127.0.0.1:9477/metrics")
    }
}

/// Counts calls of kernel functions in the guest with the function tracer (tracefs):
/// WireGuard's generic-netlink handlers show what reached the kernel, whoever sent it.
pub struct KernelCalls;

impl KernelCalls {
    /// `WG_CMD_SET_DEVICE` and `WG_CMD_GET_DEVICE` (a dump starts once per read).
    pub const SET_DEVICE: &'static str = "wg_set_device";
    pub const GET_DEVICE: &'static str = "wg_get_device_start";

    /// Starts counting (again) from zero.
    pub fn start(vm: &mut Vm) {
        vm.ok(&format!(
            "cd /sys/kernel/tracing\n\
             echo 0 > tracing_on\n\
             echo '{} {}' > set_ftrace_filter\n\
             echo function > current_tracer\n\
             echo 16384 > buffer_size_kb\n\
             echo > trace\n\
             echo 1 > tracing_on",
            Self::SET_DEVICE,
            Self::GET_DEVICE
        ));
    }

    /// Calls of `function` since [`KernelCalls::start`].
    pub fn count(vm: &mut Vm, function: &str) -> usize {
        vm.ok(&format!(
            "grep -c ' {function} ' /sys/kernel/tracing/trace || true"
        ))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("counting {function}: {e}"))
    }
}

/// An image with more programs in `/usr/bin` (`--extra`: each under its file name, with its
/// shared libraries) and more kernel modules loaded at boot (`--module`, e.g. `tun` for
/// wireguard-go), built on each call (build-image.sh caches it under its own name, so the
/// tests' image stays). `Err` only when a Debian package it needs is unavailable, as [`image`].
pub fn image_with(extras: &[&std::path::Path], modules: &[&str]) -> Result<VmImage, String> {
    require_root();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vm/build-image.sh");
    let mut command = Command::new(script);
    command.args(["--agent", env!("CARGO_BIN_EXE_wgpin-agent")]);
    for extra in extras {
        command.arg("--extra").arg(extra);
    }
    for module in modules {
        command.args(["--module", module]);
    }
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(77) => {
            let reason = stderr
                .lines()
                .filter_map(|l| l.strip_prefix("VM-IMAGE-UNAVAILABLE: "))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(if reason.is_empty() {
                stderr.trim().to_string()
            } else {
                reason
            });
        }
        _ => panic!("{script} failed ({}):\n{stdout}\n{stderr}", output.status),
    }
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{script} printed no {name}=:\n{stdout}"))
    };
    Ok(VmImage {
        vmlinux: field("vmlinux"),
        initrd: field("initrd"),
        build_time: started.elapsed(),
    })
}

impl KernelCalls {
    /// Starts counting calls of `functions` (any traceable kernel functions, e.g.
    /// `wg_get_device_dump`: one call per reply message of a dump) from zero.
    pub fn start_functions(vm: &mut Vm, functions: &[&str]) {
        vm.ok(&format!(
            "cd /sys/kernel/tracing\n\
             echo 0 > tracing_on\n\
             echo '{}' > set_ftrace_filter\n\
             echo function > current_tracer\n\
             echo 16384 > buffer_size_kb\n\
             echo > trace\n\
             echo 1 > tracing_on",
            functions.join(" ")
        ));
    }

    /// Stops tracing (the counts stay readable with [`KernelCalls::count`]).
    pub fn stop(vm: &mut Vm) {
        vm.ok("echo 0 > /sys/kernel/tracing/tracing_on");
    }
}
