//! The bpf(2) calls the agent needs and aya 0.14 does not offer.
//!
//! Identity mode attaches an fexit program to a function of the `wireguard` kernel module.
//! The kernel wants such a program loaded with the function's BTF id *in the module's BTF*
//! and a file descriptor of that BTF object (`attach_btf_obj_fd`); aya 0.14 sets only the id,
//! against vmlinux (aya-rs/aya#301). So this crate finds a module's BTF object and loads a
//! tracing program against it. Everything else (relocations, attaching, pinning) stays with
//! aya: a program loaded here is pinned, and aya adopts it from the pin.
//!
//! The calls are thin on purpose; the agent's identity tests in the kernel VM tier exercise
//! them for real.

#![allow(unsafe_code)]

use std::{
    ffi::{CStr, CString},
    io, mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_btf_info, bpf_cmd, bpf_insn, bpf_prog_type,
};

/// Calls bpf(2) with `attr`.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` that lives across the call, and
    // every pointer stored in it (by the callers below) points to memory that outlives it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// bpf(2) for a command that returns a new file descriptor.
fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a plain C union of integers; all-zero is its documented "unset".
    unsafe { mem::zeroed() }
}

/// The BTF object of kernel module `module` (as listed in /sys/kernel/btf), opened.
pub fn module_btf_fd(module: &str) -> io::Result<OwnedFd> {
    let mut id = 0u32;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        match bpf(bpf_cmd::BPF_BTF_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "listing the kernel's BTF objects (to find module {module:?}'s) needs CAP_SYS_ADMIN; the chart adds it with agent.identityMode"
                    ),
                ));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the kernel has no BTF object for module {module:?} (is it loaded, with CONFIG_DEBUG_INFO_BTF_MODULES?)"
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
        // SAFETY: the kernel filled in `next_id`.
        id = unsafe { attr.__bindgen_anon_6.next_id };
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
        let fd = match bpf_fd(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => fd,
            // Gone between the two calls (a program's BTF, freed).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let mut name = [0u8; 64];
        // SAFETY: `bpf_btf_info` is plain integers; zero means "not asked for".
        let mut info: bpf_btf_info = unsafe { mem::zeroed() };
        info.name = name.as_mut_ptr() as u64;
        info.name_len = name.len() as u32;
        let mut attr = zeroed_attr();
        // `info` and `name` outlive the call below.
        attr.info.bpf_fd = fd.as_raw_fd() as u32;
        attr.info.info = &mut info as *mut bpf_btf_info as u64;
        attr.info.info_len = mem::size_of::<bpf_btf_info>() as u32;
        bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let found = CStr::from_bytes_until_nul(&name)
            .map(|n| n.to_bytes() == module.as_bytes())
            .unwrap_or(false);
        if info.kernel_btf != 0 && found {
            return Ok(fd);
        }
    }
}

/// A tracing program to load against a module's BTF.
pub struct TracingProgram<'a> {
    /// Up to 15 bytes are kept (the kernel's limit).
    pub name: &'a str,
    pub instructions: &'a [bpf_insn],
    pub license: &'a CStr,
    /// `BPF_TRACE_FENTRY` or `BPF_TRACE_FEXIT`.
    pub attach_type: bpf_attach_type,
    /// The function's id in the module's BTF (split numbering, as the kernel counts).
    pub attach_btf_id: u32,
    /// The module's BTF object ([`module_btf_fd`]).
    pub attach_btf_obj: BorrowedFd<'a>,
}

/// The kernel refused a program; `log` is the verifier's account of why.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        let log = self.log.trim();
        if !log.is_empty() {
            // The verifier's last lines say what failed.
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            write!(f, "; verifier: {}", tail.join(" | "))?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// Loads `program` (`BPF_PROG_LOAD` of a `BPF_PROG_TYPE_TRACING` program). The first try is
/// without a verifier log (fast); a refused program is loaded again with one, for the error.
pub fn load_tracing_program(program: &TracingProgram<'_>) -> Result<OwnedFd, LoadError> {
    match load_once(program, None) {
        Ok(fd) => Ok(fd),
        Err(_) => {
            let mut log = vec![0u8; 1 << 20];
            match load_once(program, Some(&mut log)) {
                Ok(fd) => Ok(fd),
                Err(error) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    Err(LoadError {
                        error,
                        log: String::from_utf8_lossy(&log[..end]).into_owned(),
                    })
                }
            }
        }
    }
}

fn load_once(program: &TracingProgram<'_>, log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    let mut name = [0 as libc::c_char; 16];
    for (slot, byte) in name.iter_mut().zip(program.name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: writing plain fields of the union's BPF_PROG_LOAD member. The instructions, the
    // license and the log buffer are borrowed for the whole call.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
        load.expected_attach_type = program.attach_type as u32;
        load.insns = program.instructions.as_ptr() as u64;
        load.insn_cnt = program.instructions.len() as u32;
        load.license = program.license.as_ptr() as u64;
        load.prog_name = name;
        load.attach_btf_id = program.attach_btf_id;
        load.__bindgen_anon_1.attach_btf_obj_fd = program.attach_btf_obj.as_raw_fd() as u32;
        if let Some(log) = log {
            load.log_level = 1;
            load.log_buf = log.as_mut_ptr() as u64;
            load.log_size = log.len() as u32;
        }
    }
    bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// Pins `fd` (a program, map or link) at `path` on bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut attr = zeroed_attr();
    // `path` outlives the call.
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asking for a module that no kernel has says so, after walking every BTF object.
    #[test]
    fn an_unknown_module_is_not_found() {
        let error = module_btf_fd("wgpin-no-such-module").expect_err("no such module");
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
        assert!(
            error.to_string().contains("wgpin-no-such-module"),
            "{error}"
        );
    }

    #[test]
    fn vmlinux_btf_is_found_by_name() {
        // Root and a kernel with BTF: the test command runs as root on such kernels.
        let fd = module_btf_fd("vmlinux").expect("vmlinux BTF object");
        assert!(fd.as_raw_fd() >= 0);
    }
}
