//! Placement: which device each model instance runs on, from an estimate of its memory
//! (weights + KV cache for the configured context and batch) against what the inventory
//! says is free. Pure arithmetic, so it is tested on made-up inventories.

use std::fmt;

use crate::inventory::Inventory;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            s => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("device {s:?}: expected cpu or cuda:N")),
        }
    }
}

/// What a model instance needs, from its GGUF header and the worker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Needs {
    pub model: String,
    /// Bytes of weights in memory (for the CPU engine, the file plus widened scales).
    pub weights: u64,
    /// KV cache bytes per token of one sequence (all layers, keys and values).
    pub kv_per_token: u64,
    pub context: u64,
    pub batch: u64,
    /// A device the site pinned in config.
    pub pinned: Option<Device>,
}

impl Needs {
    pub fn kv_cache(&self) -> u64 {
        self.kv_per_token * self.context * self.batch
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache()
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Memory kept back: for the OS, the daemon and activations on the CPU; for the CUDA
/// context on a GPU.
pub const CPU_RESERVE: u64 = 1 << 30;
pub const GPU_RESERVE: u64 = 768 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub model: String,
    pub device: Device,
    pub bytes: u64,
}

/// Places every model: a pinned device if it fits there, else the GPU with the most free
/// memory that fits (when the build has CUDA), else the CPU. Larger models are placed
/// first. A model that fits nowhere is an error with the numbers.
pub fn place(needs: &[Needs], inv: &Inventory, cuda_built: bool) -> Result<Vec<Placement>, String> {
    let mut cpu_free = inv.memory_available.saturating_sub(CPU_RESERVE);
    let mut gpu_free: Vec<(u32, u64)> = inv
        .gpus
        .iter()
        .map(|g| (g.index, g.memory_free().saturating_sub(GPU_RESERVE)))
        .collect();
    let mut order: Vec<&Needs> = needs.iter().collect();
    order.sort_by_key(|n| std::cmp::Reverse(n.total()));
    let mut out = Vec::new();
    for n in order {
        let want = n.total();
        let what = format!(
            "model {} needs {} (weights {} + KV cache {} for {} sequences of {} tokens)",
            n.model,
            gib(want),
            gib(n.weights),
            gib(n.kv_cache()),
            n.batch,
            n.context
        );
        let device = match n.pinned {
            Some(Device::Cpu) => {
                if want > cpu_free {
                    return Err(format!(
                        "{what}; it is pinned to cpu, which has {} free",
                        gib(cpu_free)
                    ));
                }
                Device::Cpu
            }
            Some(Device::Cuda(i)) => {
                if !cuda_built {
                    return Err(format!(
                        "model {} is pinned to cuda:{i}, but this build has no CUDA",
                        n.model
                    ));
                }
                let free = gpu_free
                    .iter()
                    .find(|g| g.0 == i)
                    .map(|g| g.1)
                    .ok_or_else(|| {
                        format!(
                            "model {} is pinned to cuda:{i}, which this machine does not have",
                            n.model
                        )
                    })?;
                if want > free {
                    return Err(format!(
                        "{what}; it is pinned to cuda:{i}, which has {} free",
                        gib(free)
                    ));
                }
                Device::Cuda(i)
            }
            None => {
                let gpu = if cuda_built {
                    gpu_free
                        .iter()
                        .filter(|g| g.1 >= want)
                        .max_by_key(|g| g.1)
                        .map(|g| g.0)
                } else {
                    None
                };
                match gpu {
                    Some(i) => Device::Cuda(i),
                    None if want <= cpu_free => Device::Cpu,
                    None => {
                        let gpus: Vec<String> = gpu_free
                            .iter()
                            .map(|g| format!("cuda:{} {}", g.0, gib(g.1)))
                            .collect();
                        return Err(format!(
                            "{what}; free: cpu {}{}{}. Lower [workers] max_context or max_batch, or free memory",
                            gib(cpu_free),
                            if gpus.is_empty() { String::new() } else { format!(", {}", gpus.join(", ")) },
                            if cuda_built || inv.gpus.is_empty() { "" } else { " (GPUs unused: this build has no CUDA)" }
                        ));
                    }
                }
            }
        };
        match device {
            Device::Cpu => cpu_free -= want,
            Device::Cuda(i) => {
                if let Some(g) = gpu_free.iter_mut().find(|g| g.0 == i) {
                    g.1 -= want;
                }
            }
        }
        out.push(Placement {
            model: n.model.clone(),
            device,
            bytes: want,
        });
    }
    // Report in the order given.
    out.sort_by_key(|p| needs.iter().position(|n| n.model == p.model));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Gpu;

    const GIB: u64 = 1 << 30;

    fn inv(ram_free: u64, gpus: &[u64]) -> Inventory {
        Inventory {
            cpu_model: "test".into(),
            cpu_cores: 8,
            cpu_threads: 16,
            memory_total: 64 * GIB,
            memory_available: ram_free,
            load_average: [0.0; 3],
            disk_total: 0,
            disk_available: 0,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, free)| Gpu {
                    index: i as u32,
                    name: "GPU".into(),
                    memory_total: 80 * GIB,
                    memory_used: 80 * GIB - free,
                    utilization_percent: 0,
                    temperature_celsius: 40,
                    power_watts: 100.0,
                })
                .collect(),
            gpu_note: None,
        }
    }

    fn needs(model: &str, weights_gib: u64, kv_gib: u64, pinned: Option<Device>) -> Needs {
        Needs {
            model: model.into(),
            weights: weights_gib * GIB,
            kv_per_token: kv_gib * GIB / 1024,
            context: 1024,
            batch: 1,
            pinned,
        }
    }

    #[test]
    fn gpus_by_free_memory_then_cpu() {
        let i = inv(32 * GIB, &[20 * GIB, 40 * GIB]);
        let p = place(
            &[
                needs("a", 10, 4, None),
                needs("b", 20, 10, None),
                needs("c", 35, 0, None),
            ],
            &i,
            true,
        )
        .unwrap();
        // Largest first: c (35) on cuda:1 (39.25 free after the CUDA reserve); b (30)
        // fits no GPU now → cpu (31 free after the OS reserve); a (14) on cuda:0 (19.25).
        assert_eq!(
            p.iter()
                .map(|p| (p.model.as_str(), p.device))
                .collect::<Vec<_>>(),
            vec![
                ("a", Device::Cuda(0)),
                ("b", Device::Cpu),
                ("c", Device::Cuda(1))
            ]
        );
    }

    #[test]
    fn without_cuda_everything_goes_to_the_cpu_and_misfits_are_explained() {
        let i = inv(16 * GIB, &[80 * GIB]);
        let p = place(&[needs("a", 4, 4, None)], &i, false).unwrap();
        assert_eq!(p[0].device, Device::Cpu);
        let e = place(&[needs("big", 10, 10, None)], &i, false).unwrap_err();
        assert!(e.contains("model big needs 20.00 GiB (weights 10.00 GiB + KV cache 10.00 GiB for 1 sequences of 1024 tokens)"), "{e}");
        assert!(e.contains("free: cpu 15.00 GiB"), "{e}");
        assert!(e.contains("this build has no CUDA"), "{e}");
        // Two that fit alone but not together.
        let e = place(&[needs("a", 8, 0, None), needs("b", 8, 0, None)], &i, false).unwrap_err();
        assert!(e.contains("free: cpu 7.00 GiB"), "{e}");
    }

    #[test]
    fn pinned_devices_are_honoured_or_refused() {
        let i = inv(8 * GIB, &[10 * GIB]);
        let p = place(&[needs("a", 2, 1, Some(Device::Cuda(0)))], &i, true).unwrap();
        assert_eq!(p[0].device, Device::Cuda(0));
        assert!(place(&[needs("a", 2, 1, Some(Device::Cuda(1)))], &i, true)
            .unwrap_err()
            .contains("does not have"));
        assert!(place(&[needs("a", 2, 1, Some(Device::Cuda(0)))], &i, false)
            .unwrap_err()
            .contains("no CUDA"));
        assert!(place(&[needs("a", 9, 1, Some(Device::Cuda(0)))], &i, true)
            .unwrap_err()
            .contains("pinned to cuda:0"));
        let p = place(&[needs("a", 2, 1, Some(Device::Cpu))], &i, true).unwrap();
        assert_eq!(p[0].device, Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("gpu".parse::<Device>().is_err());
    }
}
