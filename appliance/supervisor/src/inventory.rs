//! What the box has: CPU, memory, load, the data directory's disk (sysinfo) and, when an
//! NVIDIA driver is present, each GPU (NVML, loaded at run time: no driver, no GPUs, no
//! error).

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub memory_total: u64,
    pub memory_used: u64,
    pub utilization_percent: u32,
    pub temperature_celsius: u32,
    pub power_watts: f64,
}

impl Gpu {
    pub fn memory_free(&self) -> u64 {
        self.memory_total.saturating_sub(self.memory_used)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub cpu_threads: usize,
    pub memory_total: u64,
    pub memory_available: u64,
    pub load_average: [f64; 3],
    pub disk_total: u64,
    pub disk_available: u64,
    pub gpus: Vec<Gpu>,
    /// Why there are no GPUs, when NVML could not be used.
    pub gpu_note: Option<String>,
}

/// Reads the inventory now (takes a few milliseconds; NVML is initialised per call).
pub fn read(data_dir: &Path) -> Inventory {
    use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_memory(MemoryRefreshKind::nothing().with_ram())
            .with_cpu(CpuRefreshKind::nothing()),
    )
    .ok();
    let cpu_model = sys
        .as_ref()
        .and_then(|s| s.cpus().first())
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    let load = System::load_average()
        .map(|l| [l.one, l.five, l.fifteen])
        .unwrap_or([0.0; 3]);
    let disks = Disks::new_with_refreshed_list().ok();
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let disk = disks.as_ref().and_then(|disks| {
        disks
            .iter()
            .filter(|d| dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
    });
    let (gpus, gpu_note) = gpus();
    Inventory {
        cpu_model,
        cpu_cores: System::physical_core_count().unwrap_or(0),
        cpu_threads: sys.as_ref().map(|s| s.cpus().len()).unwrap_or(0),
        memory_total: sys.as_ref().map(|s| s.total_memory()).unwrap_or(0),
        memory_available: sys.as_ref().map(|s| s.available_memory()).unwrap_or(0),
        load_average: load,
        disk_total: disk.map(|d| d.total_space()).unwrap_or(0),
        disk_available: disk.map(|d| d.available_space()).unwrap_or(0),
        gpus,
        gpu_note,
    }
}

fn gpus() -> (Vec<Gpu>, Option<String>) {
    use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => return (vec![], Some(format!("no NVIDIA driver ({e})"))),
    };
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => return (vec![], Some(format!("NVML: {e}"))),
    };
    let mut out = Vec::new();
    for index in 0..count {
        let Ok(d) = nvml.device_by_index(index) else {
            continue;
        };
        let mem = d.memory_info().ok();
        out.push(Gpu {
            index,
            name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
            memory_total: mem.as_ref().map(|m| m.total).unwrap_or(0),
            memory_used: mem.as_ref().map(|m| m.used).unwrap_or(0),
            utilization_percent: d.utilization_rates().map(|u| u.gpu).unwrap_or(0),
            temperature_celsius: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            power_watts: d.power_usage().map(|mw| mw as f64 / 1000.0).unwrap_or(0.0),
        });
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_a_cpu_memory_and_a_disk() {
        let inv = read(&std::env::temp_dir());
        assert!(inv.cpu_threads >= 1, "{inv:?}");
        assert!(
            inv.memory_total > 0 && inv.memory_available <= inv.memory_total,
            "{inv:?}"
        );
        assert!(
            inv.disk_total > 0 && inv.disk_available <= inv.disk_total,
            "{inv:?}"
        );
        // No GPU here is not an error: the note says why.
        if inv.gpus.is_empty() {
            assert!(inv.gpu_note.is_some());
        }
    }
}
