//! A cgroup v2 memory limit per worker, where the host offers one.
//!
//! Available when the daemon runs in a pure cgroup v2 hierarchy whose own group has the
//! `memory` controller and is writable (under systemd: `Delegate=yes`). Because a group
//! with children may hold no processes itself, the daemon first moves into a `daemon`
//! leaf of its group; each worker then gets a sibling `worker-<name>` with `memory.max`
//! set and swap off, and is moved there right after it starts. Anywhere else (cgroup v1
//! hosts, no delegation) the supervisor runs without it and says so once.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cgroups {
    /// The daemon's own (delegated) group.
    base: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{}: {e}", path.display()))
}

impl Cgroups {
    /// Sets up worker groups under `root` (normally /sys/fs/cgroup) for the process whose
    /// `/proc/<pid>/cgroup` reads `proc_cgroup`; `pid` is the daemon's.
    pub fn setup(root: &Path, proc_cgroup: &str, pid: u32) -> Result<Cgroups, String> {
        let lines: Vec<&str> = proc_cgroup.lines().filter(|l| !l.is_empty()).collect();
        let path = match lines.as_slice() {
            [only] => only
                .strip_prefix("0::")
                .ok_or("not a cgroup v2 hierarchy")?,
            _ => return Err("a cgroup v1 or hybrid hierarchy".into()),
        };
        let base = root.join(path.trim_start_matches('/'));
        let controllers = std::fs::read_to_string(base.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", base.display()))?;
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(format!(
                "no memory controller delegated to {}",
                base.display()
            ));
        }
        let leaf = base.join("daemon");
        std::fs::create_dir_all(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
        write(&leaf.join("cgroup.procs"), &pid.to_string())?;
        write(&base.join("cgroup.subtree_control"), "+memory")?;
        Ok(Cgroups { base })
    }

    /// Setup against the live system for this process.
    pub fn detect() -> Result<Cgroups, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        Cgroups::setup(Path::new("/sys/fs/cgroup"), &own, std::process::id())
    }

    fn group(&self, worker: &str) -> PathBuf {
        let safe: String = worker
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.base.join(format!("worker-{safe}"))
    }

    /// Puts a started worker under a memory limit of `bytes` (no swap).
    pub fn limit(&self, worker: &str, pid: u32, bytes: u64) -> Result<(), String> {
        let g = self.group(worker);
        std::fs::create_dir_all(&g).map_err(|e| format!("{}: {e}", g.display()))?;
        write(&g.join("memory.max"), &bytes.to_string())?;
        // Not every kernel has swap accounting; the limit stands without it.
        let _ = write(&g.join("memory.swap.max"), "0");
        write(&g.join("cgroup.procs"), &pid.to_string())
    }

    /// Removes a worker's group once it is empty (after its process ended).
    pub fn release(&self, worker: &str) {
        let _ = std::fs::remove_dir(self.group(worker));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str, controllers: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("appliance-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let base = root.join("system.slice/appliance.service");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(base.join("cgroup.subtree_control"), "").unwrap();
        root
    }

    #[test]
    fn v2_with_memory_delegated_moves_the_daemon_to_a_leaf_and_limits_workers() {
        let root = fake_root("ok", "cpu memory pids\n");
        let c = Cgroups::setup(&root, "0::/system.slice/appliance.service\n", 42).unwrap();
        let base = root.join("system.slice/appliance.service");
        assert_eq!(
            std::fs::read_to_string(base.join("daemon/cgroup.procs")).unwrap(),
            "42"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        c.limit("smol#1", 77, 3 << 30).unwrap();
        let g = base.join("worker-smol_1");
        assert_eq!(
            std::fs::read_to_string(g.join("memory.max")).unwrap(),
            (3u64 << 30).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(g.join("cgroup.procs")).unwrap(),
            "77"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn elsewhere_it_says_why_not() {
        let root = fake_root("no", "cpu pids\n");
        let e = Cgroups::setup(&root, "0::/system.slice/appliance.service\n", 1).unwrap_err();
        assert!(e.contains("no memory controller"), "{e}");
        let e = Cgroups::setup(&root, "4:memory:/x\n0::/\n", 1).unwrap_err();
        assert!(e.contains("v1"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
