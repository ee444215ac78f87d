//! One interface over the two ways to drive WireGuard: the kernel (generic netlink, devices
//! created over rtnetlink) and userspace implementations (UAPI, one process per device).

use std::{path::PathBuf, process::Command, sync::Mutex};

use wgpin_crds::WireGuardBackend as BackendKind;

use super::{
    model::{DeviceConfig, DeviceState, PeerChange},
    netlink::{Netlink, NetlinkError},
    uapi::Uapi,
};

/// Which WireGuard to use.
pub enum Backend {
    /// Kernel WireGuard. The netlink client is opened on first use, in the namespace of the
    /// thread that uses it.
    Kernel(Mutex<Option<Netlink>>),
    /// A userspace implementation: `program <device>` starts one, UAPI configures it.
    Userspace { uapi: Uapi, program: PathBuf },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kernel(_) => f.write_str("Kernel"),
            Self::Userspace { uapi, program } => {
                write!(f, "Userspace({uapi:?}, {})", program.display())
            }
        }
    }
}

impl Backend {
    pub fn kernel() -> Self {
        Self::Kernel(Mutex::new(None))
    }

    pub fn userspace(uapi: Uapi, program: impl Into<PathBuf>) -> Self {
        Self::Userspace {
            uapi,
            program: program.into(),
        }
    }

    /// Kernel WireGuard when this kernel has it, else `program` (wireguard-go, boringtun).
    pub fn detect(uapi: Uapi, program: impl Into<PathBuf>) -> Self {
        match Netlink::connect() {
            Ok(client) => Self::Kernel(Mutex::new(Some(client))),
            Err(_) => Self::userspace(uapi, program),
        }
    }

    /// For status reports.
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Kernel(_) => BackendKind::Kernel,
            Self::Userspace { .. } => BackendKind::Userspace,
        }
    }

    fn with_netlink<T>(
        client: &Mutex<Option<Netlink>>,
        f: impl FnOnce(&mut Netlink) -> Result<T, NetlinkError>,
    ) -> Result<T, String> {
        let mut guard = client
            .lock()
            .map_err(|_| "netlink client poisoned".to_string())?;
        if guard.is_none() {
            *guard = Some(Netlink::connect().map_err(|e| e.to_string())?);
        }
        match guard.as_mut() {
            Some(netlink) => f(netlink).map_err(|e| e.to_string()),
            None => Err("no netlink client".into()),
        }
    }

    /// Reads a device; `Err` when it does not exist or cannot be read.
    pub fn get(&self, device: &str) -> Result<DeviceState, String> {
        match self {
            Self::Kernel(client) => Self::with_netlink(client, |n| n.get(device)),
            Self::Userspace { uapi, .. } => uapi.get(device).map_err(|e| e.to_string()),
        }
    }

    /// Writes device settings and peer changes.
    pub fn set(
        &self,
        device: &str,
        config: &DeviceConfig,
        changes: &[PeerChange],
    ) -> Result<(), String> {
        match self {
            Self::Kernel(client) => Self::with_netlink(client, |n| n.set(device, config, changes)),
            Self::Userspace { uapi, .. } => {
                uapi.set(device, config, changes).map_err(|e| e.to_string())
            }
        }
    }

    /// Whether the device exists and answers.
    pub fn exists(&self, device: &str) -> bool {
        match self {
            Self::Kernel(_) => self.get(device).is_ok(),
            Self::Userspace { uapi, .. } => uapi.exists(device),
        }
    }

    /// Creates the device. Kernel: a `wireguard` link; userspace: the program, which
    /// daemonizes once its UAPI socket is up (so it outlives the agent).
    pub async fn create(&self, rtnl: &rtnetlink::Handle, device: &str) -> Result<(), String> {
        match self {
            Self::Kernel(_) => rtnl
                .link()
                .add(rtnetlink::LinkWireguard::new(device).build())
                .execute()
                .await
                .map_err(|e| format!("creating WireGuard device {device}: {e}")),
            Self::Userspace { uapi, program } => {
                let output = Command::new(program)
                    .arg(device)
                    .env_remove("WG_PROCESS_FOREGROUND")
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
                if !output.status.success() || !uapi.exists(device) {
                    return Err(format!(
                        "{} {device} did not start ({}): {}",
                        program.display(),
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ));
                }
                Ok(())
            }
        }
    }
}
