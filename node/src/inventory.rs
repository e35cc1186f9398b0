//! What the box has, for heartbeats and `outpost status`: CPU, memory, disks, GPUs, and what
//! the container runtime reports. Only cheap refreshes (no process table) keep the agent small.

use outpost_protocol::{Disk, Gpu, Inventory};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

use crate::runtime::RuntimeInfo;

pub fn collect(runtime: Option<&RuntimeInfo>) -> Inventory {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_memory(MemoryRefreshKind::nothing().with_ram())
            .with_cpu(CpuRefreshKind::nothing()),
    );
    let cpus = sys.cpus();
    let disks = Disks::new_with_refreshed_list()
        .iter()
        .map(|d| Disk {
            mount_point: d.mount_point().display().to_string(),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        })
        .collect();
    Inventory {
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        cpu_model: cpus.first().map(|c| c.brand().trim().to_string()).unwrap_or_default(),
        cpu_count: cpus.len() as u32,
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
        disks,
        gpus: gpus(),
        docker_version: runtime.map(|r| r.version.clone()),
        images: runtime.map(|r| r.images.clone()).unwrap_or_default(),
    }
}

/// NVIDIA GPUs by their driver's proc entries, other GPUs by DRM render nodes.
fn gpus() -> Vec<Gpu> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc/driver/nvidia/gpus") {
        for e in entries.flatten() {
            let info = std::fs::read_to_string(e.path().join("information")).unwrap_or_default();
            let name = info
                .lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| "NVIDIA GPU".into());
            out.push(Gpu { vendor: "nvidia".into(), name, device: e.file_name().to_string_lossy().into() });
        }
    }
    if out.is_empty()
        && let Ok(entries) = std::fs::read_dir("/dev/dri")
    {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("renderD") {
                out.push(Gpu { vendor: "drm".into(), name: n.clone(), device: format!("/dev/dri/{n}") });
            }
        }
    }
    out
}

/// The node as a heartbeat describes it (inventory, labels, models, capabilities), for the
/// agent's heartbeats and for the uplinks that are files: an offline enrollment request and a
/// results bundle.
pub fn heartbeat(
    cfg: &crate::config::Config,
    runtime: Option<&RuntimeInfo>,
    depths: crate::ledger::Depths,
) -> outpost_protocol::Heartbeat {
    outpost_protocol::Heartbeat {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        inventory: collect(runtime),
        running_jobs: u32::try_from(depths.running).unwrap_or(u32::MAX),
        outbox_depth: depths.outbox,
        relay: None,
        // A handful of small manifest files: cheap enough to read every time.
        models: crate::models::ModelStore::new(cfg.models_dir()).summaries(),
        labels: cfg.node.labels.clone(),
        announce: Some(outpost_protocol::Announce::this_build()),
        awaiting_approval: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn inventory_reports_this_machine() {
        let inv = super::collect(None);
        assert!(inv.cpu_count >= 1);
        assert!(inv.memory_total_bytes > 0);
        assert!(inv.memory_available_bytes <= inv.memory_total_bytes);
        assert!(!inv.hostname.is_empty());
    }
}
