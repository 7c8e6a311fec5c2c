//! Fake cgroupfs trees for both drivers (files laid out as the kernel provides them), and the v1
//! driver against the real kernel (this team's machines and CI are v1; the real v2 path cannot
//! run there, so the fakes exercise it fully).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use super::*;

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const MIB: u64 = 1024 * 1024;
/// What v1 memory limit files read back when unlimited (LONG_MAX rounded down to a page).
const V1_UNLIMITED: &str = "9223372036854771712";

fn read(path: impl AsRef<Path>) -> TestResult<String> {
    let path = path.as_ref();
    Ok(fs::read_to_string(path)
        .map_err(|e| format!("read {}: {e}", path.display()))?
        .trim()
        .to_string())
}

fn write(path: impl AsRef<Path>, text: &str) -> TestResult {
    Ok(fs::write(path, text)?)
}

fn limits() -> Resources {
    Resources {
        memory_limit: Some(128 * MIB),
        memory_swap_off: true,
        cpu_quota: Some((50_000, 100_000)),
        cpu_weight: Some(100),
        pids_limit: Some(20),
    }
}

fn invalid_resources() -> Vec<Resources> {
    vec![
        Resources {
            memory_limit: Some(4095),
            ..Resources::default()
        },
        Resources {
            memory_limit: Some(u64::MAX),
            ..Resources::default()
        },
        Resources {
            cpu_quota: Some((0, 100_000)),
            ..Resources::default()
        },
        Resources {
            cpu_quota: Some((-5, 100_000)),
            ..Resources::default()
        },
        Resources {
            cpu_quota: Some((50_000, 0)),
            ..Resources::default()
        },
        Resources {
            cpu_quota: Some((50_000, 2_000_000)),
            ..Resources::default()
        },
        Resources {
            cpu_weight: Some(0),
            ..Resources::default()
        },
        Resources {
            cpu_weight: Some(10_001),
            ..Resources::default()
        },
        Resources {
            pids_limit: Some(0),
            ..Resources::default()
        },
        Resources {
            pids_limit: Some(-2),
            ..Resources::default()
        },
    ]
}

/// Kills and reaps a child on drop, so a failed assertion leaves no process behind.
struct ChildGuard(Child);

impl ChildGuard {
    fn sleep() -> TestResult<Self> {
        Ok(ChildGuard(Command::new("sleep").arg("30").spawn()?))
    }

    fn pid(&self) -> TestResult<i32> {
        Ok(i32::try_from(self.0.id())?)
    }

    fn wait_signal(&mut self) -> TestResult<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        Ok(self.0.wait()?.signal())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------- shared rules

#[test]
fn resources_default_has_swap_off_and_serde_keeps_it() -> TestResult {
    assert!(Resources::default().memory_swap_off);
    let parsed: Resources = serde_json::from_str(r#"{"memory_limit": 1048576}"#)?;
    assert_eq!(
        parsed,
        Resources {
            memory_limit: Some(MIB),
            ..Resources::default()
        }
    );
    let round: Resources = serde_json::from_str(&serde_json::to_string(&limits())?)?;
    assert_eq!(round, limits());
    Ok(())
}

#[test]
fn invalid_resources_are_one_sentence_each() {
    let messages: Vec<String> = invalid_resources()
        .iter()
        .filter_map(|r| r.validate().err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(messages.len(), invalid_resources().len());
    assert_eq!(
        messages[0],
        "memory limit 4095 bytes is outside 4096..=9223372036854775807 bytes"
    );
    assert_eq!(
        messages[2],
        "cpu quota 0 us must be -1 (unlimited) or at least 1000 us"
    );
    assert_eq!(messages[4], "cpu period 0 us is outside 1000..=1000000 us");
    assert_eq!(messages[6], "cpu weight 0 is outside 1..=10000");
    assert_eq!(
        messages[8],
        "pids limit 0 must be -1 (unlimited) or at least 1"
    );
    let fine = Resources {
        cpu_quota: Some((-1, 100_000)),
        pids_limit: Some(-1),
        ..limits()
    };
    assert_eq!(fine.validate(), Ok(()));
}

#[test]
fn paths_must_be_relative_and_plain() -> TestResult {
    assert_eq!(split_path("tug/abc")?, vec!["tug", "abc"]);
    assert_eq!(split_path("/tug/abc")?, vec!["tug", "abc"]);
    for bad in ["", "/", "tug//x", "tug/../x", "./tug", "tug/x/"] {
        assert!(
            matches!(split_path(bad), Err(InvalidInput::Path { .. })),
            "{bad:?} accepted"
        );
    }
    Ok(())
}

#[test]
fn weight_to_shares_matches_runc() {
    assert_eq!(weight_to_shares(1), 2);
    assert_eq!(weight_to_shares(100), 2597);
    assert_eq!(weight_to_shares(500), 13_084);
    assert_eq!(weight_to_shares(10_000), 262_144);
}

#[test]
fn limits_parse_numbers_and_unlimited_forms() -> TestResult {
    assert_eq!(parse_limit("134217728\n")?, Some(134_217_728));
    assert_eq!(parse_limit("max\n")?, None);
    assert_eq!(parse_limit("-1")?, None);
    assert_eq!(parse_limit(V1_UNLIMITED)?, None);
    // 64 KiB pages round LONG_MAX further down
    assert_eq!(parse_limit("9223372036854710272")?, None);
    assert!(parse_limit("lots").is_err());
    Ok(())
}

// ---------------------------------------------------------------- detection

/// This machine's /proc/self/mountinfo (hybrid), plus a co-mounted cpu,cpuacct elsewhere that
/// must lose to the first mounts, and a mount point with an escaped space.
const HYBRID_MOUNTINFO: &str = "\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:29 / /mnt/cpu\\040both rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct
51 23 0:40 / /mnt/net\\040cls rw,relatime shared:6 master:2 - cgroup none rw,net_cls,net_prio
";

#[test]
fn mountinfo_gives_each_v1_controller_its_mount() {
    let mounts = v1::Mounts::from_mountinfo(HYBRID_MOUNTINFO);
    assert_eq!(
        mounts.get("memory"),
        Some(Path::new("/sys/fs/cgroup/memory"))
    );
    assert_eq!(mounts.get("cpu"), Some(Path::new("/sys/fs/cgroup/cpu")));
    assert_eq!(
        mounts.get("cpuacct"),
        Some(Path::new("/sys/fs/cgroup/cpuacct"))
    );
    assert_eq!(mounts.get("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
    assert_eq!(
        mounts.get("freezer"),
        Some(Path::new("/sys/fs/cgroup/freezer"))
    );
    assert_eq!(mounts.get("net_cls"), Some(Path::new("/mnt/net cls")));
    assert_eq!(mounts.get("name=systemd"), None);
    assert_eq!(mounts.get("hugetlb"), None, "the cgroup2 mount is not v1");
    assert!(mounts.missing().is_empty());

    let comounted = v1::Mounts::from_mountinfo(
        "50 23 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
    );
    assert_eq!(
        comounted.get("cpuacct"),
        Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
    );
    assert_eq!(comounted.missing(), vec!["memory", "pids"]);
}

#[test]
fn hybrid_host_detects_as_v1() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mountinfo = dir.path().join("mountinfo");
    write(&mountinfo, HYBRID_MOUNTINFO)?;
    // /sys/fs/cgroup is a tmpfs: not cgroup2, so v1 whatever the unified mount offers
    let driver = CgroupDriver::decide(Path::new("/sys/fs/cgroup"), false, &mountinfo)?;
    let CgroupDriver::V1 { mounts } = driver else {
        return Err(format!("expected v1, got {driver:?}").into());
    };
    assert_eq!(
        mounts.get("memory"),
        Some(Path::new("/sys/fs/cgroup/memory"))
    );
    Ok(())
}

#[test]
fn v2_root_needs_memory_cpu_and_pids() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mountinfo = dir.path().join("mountinfo");
    write(&mountinfo, HYBRID_MOUNTINFO)?;
    let root = dir.path().join("root");
    fs::create_dir(&root)?;

    write(
        root.join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    )?;
    let driver = CgroupDriver::decide(&root, true, &mountinfo)?;
    assert_eq!(driver, CgroupDriver::V2 { root: root.clone() });
    assert!(driver.is_v2());

    // like /sys/fs/cgroup/unified here: cgroup2 with only hugetlb -> the v1 mounts
    write(root.join("cgroup.controllers"), "hugetlb\n")?;
    let driver = CgroupDriver::decide(&root, true, &mountinfo)?;
    assert!(!driver.is_v2(), "{driver:?}");

    // and with no v1 mounts either, nothing is usable: say why
    write(&mountinfo, "")?;
    let err = match CgroupDriver::decide(&root, true, &mountinfo) {
        Ok(d) => return Err(format!("detected {d:?}").into()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("cgroup.controllers lacks cpu, memory, pids"),
        "{err}"
    );
    assert!(
        err.contains("no cgroup v1 mount for memory, cpu, cpuacct, pids"),
        "{err}"
    );
    Ok(())
}

// ---------------------------------------------------------------- v1, fake tree

struct FakeV1 {
    dir: TempDir,
    driver: CgroupDriver,
}

impl FakeV1 {
    /// memory, cpu, cpuacct, pids and freezer hierarchies; with swap accounting the memory root
    /// has memory.memsw.limit_in_bytes, as the kernel's does.
    fn new(swap_accounting: bool) -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let mut mounts = v1::Mounts::default();
        for controller in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
            let mount = dir.path().join(controller);
            fs::create_dir(&mount)?;
            write(mount.join("cgroup.procs"), "")?;
            mounts = mounts.with(controller, mount);
        }
        write(
            dir.path().join("memory/memory.limit_in_bytes"),
            V1_UNLIMITED,
        )?;
        if swap_accounting {
            write(
                dir.path().join("memory/memory.memsw.limit_in_bytes"),
                V1_UNLIMITED,
            )?;
        }
        Ok(FakeV1 {
            dir,
            driver: CgroupDriver::V1 { mounts },
        })
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// What the kernel puts in a fresh memory cgroup with swap accounting.
    fn kernel_memory_files(&self, leaf: &str) -> TestResult {
        let dir = self.path(&format!("memory/{leaf}"));
        fs::create_dir_all(&dir)?;
        write(dir.join("memory.limit_in_bytes"), V1_UNLIMITED)?;
        write(dir.join("memory.memsw.limit_in_bytes"), V1_UNLIMITED)?;
        Ok(())
    }

    /// Every directory below the hierarchy roots.
    fn dirs(&self) -> TestResult<Vec<String>> {
        let mut found = Vec::new();
        for controller in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
            let mut stack = vec![self.path(controller)];
            while let Some(dir) = stack.pop() {
                for entry in fs::read_dir(&dir)? {
                    let entry = entry?;
                    if entry.file_type()?.is_dir() {
                        let rel = entry.path().strip_prefix(self.dir.path())?.to_owned();
                        found.push(rel.display().to_string());
                        stack.push(entry.path());
                    }
                }
            }
        }
        found.sort();
        Ok(found)
    }
}

#[test]
fn v1_create_writes_limits_in_every_hierarchy() -> TestResult {
    let fake = FakeV1::new(false)?;
    let cg = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    assert_eq!(cg.path(), "tug/c1");
    assert!(cg.exists());
    assert_eq!(
        fake.dirs()?,
        [
            "cpu/tug",
            "cpu/tug/c1",
            "cpuacct/tug",
            "cpuacct/tug/c1",
            "freezer/tug",
            "freezer/tug/c1",
            "memory/tug",
            "memory/tug/c1",
            "pids/tug",
            "pids/tug/c1",
        ]
    );
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.limit_in_bytes"))?,
        "134217728"
    );
    assert!(
        !fake
            .path("memory/tug/c1/memory.memsw.limit_in_bytes")
            .exists(),
        "no swap accounting, no memsw"
    );
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_period_us"))?, "100000");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_quota_us"))?, "50000");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.shares"))?, "2597");
    assert_eq!(read(fake.path("pids/tug/c1/pids.max"))?, "20");
    assert_eq!(cg.v2_dir(), None);
    assert_eq!(
        cg.procs_paths(),
        ["memory", "cpu", "cpuacct", "pids", "freezer"]
            .map(|c| fake.path(&format!("{c}/tug/c1/cgroup.procs")))
    );

    cg.add_process(4242)?;
    for path in cg.procs_paths() {
        assert_eq!(read(path)?, "4242");
    }
    assert_eq!(cg.pids()?, vec![4242]);
    Ok(())
}

#[test]
fn v1_update_writes_every_limit_and_unlimited_forms() -> TestResult {
    let fake = FakeV1::new(false)?;
    let cg = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    cg.update(&Resources {
        cpu_quota: Some((20_000, 50_000)),
        cpu_weight: Some(10_000),
        ..limits()
    })?;
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_period_us"))?, "50000");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_quota_us"))?, "20000");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.shares"))?, "262144");

    cg.update(&Resources::default())?;
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.limit_in_bytes"))?,
        "-1"
    );
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_quota_us"))?, "-1");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_period_us"))?, "100000");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.shares"))?, "1024");
    assert_eq!(read(fake.path("pids/tug/c1/pids.max"))?, "max");

    cg.update(&Resources {
        cpu_quota: Some((-1, 250_000)),
        pids_limit: Some(-1),
        ..Resources::default()
    })?;
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_quota_us"))?, "-1");
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_period_us"))?, "250000");
    assert_eq!(read(fake.path("pids/tug/c1/pids.max"))?, "max");

    // an invalid update changes nothing
    let before = read(fake.path("cpu/tug/c1/cpu.cfs_period_us"))?;
    for bad in invalid_resources() {
        let err = cg.update(&bad).err().ok_or("invalid update accepted")?;
        assert!(err.is_invalid_input(), "{err}");
    }
    assert_eq!(read(fake.path("cpu/tug/c1/cpu.cfs_period_us"))?, before);
    Ok(())
}

#[test]
fn v1_memsw_is_written_in_the_order_the_kernel_accepts() {
    let mem = "memory.limit_in_bytes";
    let sw = "memory.memsw.limit_in_bytes";
    let plan = |current, limit, swap_off| v1::memory_plan(current, limit, swap_off, true);
    // raising: memsw first (the limit may never exceed it)
    assert_eq!(
        plan(Some(64 * MIB), Some(128 * MIB), true),
        vec![
            (sw, "134217728".to_string()),
            (mem, "134217728".to_string())
        ]
    );
    // lowering: the limit first (memsw may never drop below it)
    assert_eq!(
        plan(Some(128 * MIB), Some(64 * MIB), true),
        vec![(mem, "67108864".to_string()), (sw, "67108864".to_string())]
    );
    // from unlimited (fresh cgroup): limit first, memsw is still unlimited
    assert_eq!(
        plan(None, Some(64 * MIB), true),
        vec![(mem, "67108864".to_string()), (sw, "67108864".to_string())]
    );
    // swap allowed or no limit: memsw to unlimited first
    assert_eq!(
        plan(Some(64 * MIB), Some(32 * MIB), false),
        vec![(sw, "-1".to_string()), (mem, "33554432".to_string())]
    );
    assert_eq!(
        plan(Some(64 * MIB), None, true),
        vec![(sw, "-1".to_string()), (mem, "-1".to_string())]
    );
    // no swap accounting: only the limit
    assert_eq!(
        v1::memory_plan(Some(64 * MIB), Some(32 * MIB), true, false),
        vec![(mem, "33554432".to_string())]
    );
}

#[test]
fn v1_swap_off_sets_memsw_equal_to_the_limit() -> TestResult {
    let fake = FakeV1::new(true)?;
    fake.kernel_memory_files("tug/c1")?;
    let cg = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.limit_in_bytes"))?,
        "134217728"
    );
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.memsw.limit_in_bytes"))?,
        "134217728"
    );
    cg.update(&Resources {
        memory_limit: Some(32 * MIB),
        ..limits()
    })?;
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.limit_in_bytes"))?,
        "33554432"
    );
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.memsw.limit_in_bytes"))?,
        "33554432"
    );
    cg.update(&Resources {
        memory_swap_off: false,
        ..limits()
    })?;
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.limit_in_bytes"))?,
        "134217728"
    );
    assert_eq!(
        read(fake.path("memory/tug/c1/memory.memsw.limit_in_bytes"))?,
        "-1"
    );
    Ok(())
}

const V1_MEMORY_STAT: &str = "\
cache 31457280
rss 73400320
rss_huge 0
shmem 0
mapped_file 4096000
dirty 20480
writeback 0
swap 0
pgpgin 38714
pgpgout 35354
pgfault 40705
pgmajfault 0
inactive_anon 0
active_anon 73400320
inactive_file 10485760
active_file 20971520
unevictable 0
hierarchical_memory_limit 134217728
hierarchical_memsw_limit 134217728
total_cache 31457280
total_rss 73400320
total_rss_huge 0
total_shmem 0
total_mapped_file 4096000
total_dirty 20480
total_writeback 0
total_swap 0
total_pgpgin 38714
total_pgpgout 35354
total_pgfault 40705
total_pgmajfault 0
total_inactive_anon 0
total_active_anon 73400320
total_inactive_file 20971520
total_active_file 10485760
total_unevictable 0
";

#[test]
fn v1_stats_read_the_kernel_files() -> TestResult {
    let fake = FakeV1::new(false)?;
    let cg = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    let mem = fake.path("memory/tug/c1");
    write(mem.join("memory.usage_in_bytes"), "104857600\n")?;
    write(mem.join("memory.limit_in_bytes"), "134217728\n")?;
    write(mem.join("memory.max_usage_in_bytes"), "120000000\n")?;
    write(mem.join("memory.stat"), V1_MEMORY_STAT)?;
    write(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )?;
    write(fake.path("cpuacct/tug/c1/cpuacct.usage"), "5000000000\n")?;
    write(
        fake.path("cpuacct/tug/c1/cpuacct.stat"),
        "user 150\nsystem 50\n",
    )?;
    write(
        fake.path("cpu/tug/c1/cpu.stat"),
        "nr_periods 10\nnr_throttled 4\nthrottled_time 123456789\nnr_bursts 0\nburst_time 0\n",
    )?;
    write(fake.path("pids/tug/c1/pids.current"), "7\n")?;

    let hz = v1::clock_ticks();
    assert_eq!(
        cg.stats()?,
        Stats {
            cpu_usage_ns: 5_000_000_000,
            cpu_user_ns: 150 * 1_000_000_000 / hz,
            cpu_system_ns: 50 * 1_000_000_000 / hz,
            cpu_throttled_periods: 4,
            cpu_throttled_ns: 123_456_789,
            memory_usage: 104_857_600,
            memory_limit: Some(134_217_728),
            memory_max_usage: Some(120_000_000),
            // usage - total_inactive_file (not the cgroup-local inactive_file)
            memory_working_set: 104_857_600 - 20_971_520,
            memory_rss: 73_400_320,
            memory_cache: 31_457_280,
            oom_kills: 3,
            pids_current: 7,
            pids_limit: Some(20),
        }
    );

    // working set saturates; unlimited reads back as None
    write(
        mem.join("memory.stat"),
        &V1_MEMORY_STAT.replace(
            "total_inactive_file 20971520",
            "total_inactive_file 999999999",
        ),
    )?;
    write(mem.join("memory.limit_in_bytes"), V1_UNLIMITED)?;
    write(fake.path("pids/tug/c1/pids.max"), "max\n")?;
    let stats = cg.stats()?;
    assert_eq!(stats.memory_working_set, 0);
    assert_eq!(stats.memory_limit, None);
    assert_eq!(stats.pids_limit, None);

    // a garbled file is an error naming it
    write(fake.path("pids/tug/c1/pids.current"), "seven\n")?;
    let err = cg.stats().err().ok_or("garbage parsed")?.to_string();
    assert!(err.contains("pids/tug/c1/pids.current"), "{err}");
    Ok(())
}

#[test]
fn v1_ticks_convert_to_nanoseconds() {
    assert_eq!(v1::ticks_to_ns(150, 100), 1_500_000_000);
    assert_eq!(v1::ticks_to_ns(3, 1024), 2_929_687);
    assert_eq!(v1::ticks_to_ns(u64::MAX, 1), u64::MAX);
    assert_eq!(v1::clock_ticks(), 100, "USER_HZ on Linux");
}

#[test]
fn v1_remove_is_idempotent_and_leaves_the_parent() -> TestResult {
    let fake = FakeV1::new(false)?;
    let cg = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    cg.remove()?;
    assert!(!cg.exists());
    assert_eq!(
        fake.dirs()?,
        [
            "cpu/tug",
            "cpuacct/tug",
            "freezer/tug",
            "memory/tug",
            "pids/tug"
        ]
    );
    cg.remove()?;
    assert!(matches!(
        Cgroup::open(&fake.driver, "tug/c1"),
        Err(CgroupError::V1(v1::Error::NotFound { .. }))
    ));
    Cgroup::open(&fake.driver, "tug")?.remove()?;
    assert!(fake.dirs()?.is_empty());
    Ok(())
}

#[test]
fn v1_open_readopts_an_existing_cgroup() -> TestResult {
    let fake = FakeV1::new(false)?;
    let created = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    let opened = Cgroup::open(&fake.driver, "/tug/c1")?;
    assert_eq!(opened.path(), "tug/c1");
    assert_eq!(opened.procs_paths(), created.procs_paths());
    opened.update(&Resources::default())?;
    assert_eq!(read(fake.path("pids/tug/c1/pids.max"))?, "max");
    Ok(())
}

#[test]
fn v1_invalid_input_creates_nothing() -> TestResult {
    let fake = FakeV1::new(false)?;
    for bad in invalid_resources() {
        let err = Cgroup::create(&fake.driver, "tug/c1", &bad)
            .err()
            .ok_or_else(|| format!("{bad:?} accepted"))?;
        assert!(err.is_invalid_input(), "{err}");
    }
    for bad in ["", "tug/../../etc", "tug//c1"] {
        let err = Cgroup::create(&fake.driver, bad, &limits())
            .err()
            .ok_or_else(|| format!("{bad:?} accepted"))?;
        assert!(err.is_invalid_input(), "{err}");
    }
    assert!(fake.dirs()?.is_empty(), "{:?}", fake.dirs()?);
    Ok(())
}

#[test]
fn v1_missing_controller_is_an_error_before_anything_is_made() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut mounts = v1::Mounts::default();
    for controller in ["memory", "cpu", "cpuacct"] {
        fs::create_dir(dir.path().join(controller))?;
        mounts = mounts.with(controller, dir.path().join(controller));
    }
    let err = Cgroup::create(&CgroupDriver::V1 { mounts }, "tug/c1", &limits())
        .err()
        .ok_or("created without pids")?;
    assert_eq!(err.to_string(), "cgroup v1 controller(s) pids not mounted");
    assert!(!dir.path().join("memory/tug").exists());
    Ok(())
}

#[test]
fn v1_failed_create_removes_what_it_made() -> TestResult {
    let fake = FakeV1::new(false)?;
    // the pids hierarchy already has c1, with a directory where the kernel has pids.max
    fs::create_dir_all(fake.path("pids/tug/c1/pids.max"))?;
    let err = Cgroup::create(&fake.driver, "tug/c1", &limits())
        .err()
        .ok_or("create succeeded")?;
    let message = err.to_string();
    let expected = format!(
        "write 20 to {}: ",
        fake.path("pids/tug/c1/pids.max").display()
    );
    assert!(message.starts_with(&expected), "{message}");
    // everything made by create is gone; what existed before stays
    assert_eq!(
        fake.dirs()?,
        ["pids/tug", "pids/tug/c1", "pids/tug/c1/pids.max"]
    );

    // a hierarchy where a directory cannot be made: the others are rolled back
    let fake = FakeV1::new(false)?;
    write(fake.path("pids/tug"), "not a directory")?;
    let err = Cgroup::create(&fake.driver, "tug/c1", &limits())
        .err()
        .ok_or("create succeeded")?;
    assert!(
        err.to_string()
            .starts_with(&format!("create {}: ", fake.path("pids/tug/c1").display())),
        "{err}"
    );
    assert!(fake.dirs()?.is_empty(), "{:?}", fake.dirs()?);
    Ok(())
}

#[test]
fn v1_kill_all_freezes_signals_and_thaws() -> TestResult {
    let fake = FakeV1::new(false)?;
    let cg = Cgroup::create(&fake.driver, "tug/c1", &limits())?;
    let state = fake.path("freezer/tug/c1/freezer.state");
    write(&state, "THAWED\n")?;
    let mut child = ChildGuard::sleep()?;
    cg.add_process(child.pid()?)?;
    cg.kill_all(Signal::SIGKILL)?;
    assert_eq!(child.wait_signal()?, Some(Signal::SIGKILL as i32));
    assert_eq!(read(&state)?, "THAWED");

    // without a freezer: plain rounds of signals
    fs::remove_file(&state)?;
    let mut child = ChildGuard::sleep()?;
    cg.add_process(child.pid()?)?;
    cg.kill_all(Signal::SIGTERM)?;
    assert_eq!(child.wait_signal()?, Some(Signal::SIGTERM as i32));
    Ok(())
}

// ---------------------------------------------------------------- v2, fake tree

/// A cgroup2 root as the kernel shows it: controllers on offer, `subtree_control` as given.
fn fake_v2(controllers: &str, subtree_control: &str) -> TestResult<(TempDir, CgroupDriver)> {
    let dir = tempfile::tempdir()?;
    write(dir.path().join("cgroup.controllers"), controllers)?;
    write(dir.path().join("cgroup.subtree_control"), subtree_control)?;
    write(dir.path().join("cgroup.procs"), "1\n")?;
    let driver = CgroupDriver::V2 {
        root: dir.path().to_path_buf(),
    };
    Ok((dir, driver))
}

fn subdirs(root: &Path) -> TestResult<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                found.push(entry.path().strip_prefix(root)?.display().to_string());
                stack.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

#[test]
fn v2_create_delegates_controllers_from_the_root_down() -> TestResult {
    let (dir, driver) = fake_v2("cpuset cpu io memory hugetlb pids\n", "\n")?;
    let root = dir.path();
    let cg = Cgroup::create(&driver, "tug/pods/c1", &limits())?;
    assert_eq!(subdirs(root)?, ["tug", "tug/pods", "tug/pods/c1"]);
    for ancestor in [root.to_path_buf(), root.join("tug"), root.join("tug/pods")] {
        assert_eq!(
            read(ancestor.join("cgroup.subtree_control"))?,
            "+cpu +memory +pids",
            "{}",
            ancestor.display()
        );
    }
    let leaf = root.join("tug/pods/c1");
    assert!(
        !leaf.join("cgroup.subtree_control").exists(),
        "the leaf holds processes, it delegates nothing"
    );
    assert_eq!(read(leaf.join("memory.max"))?, "134217728");
    assert!(
        !leaf.join("memory.swap.max").exists(),
        "no swap accounting, nothing written"
    );
    assert_eq!(read(leaf.join("cpu.max"))?, "50000 100000");
    assert_eq!(read(leaf.join("cpu.weight"))?, "100");
    assert_eq!(read(leaf.join("pids.max"))?, "20");
    assert_eq!(cg.v2_dir(), Some(leaf.as_path()));
    assert_eq!(cg.procs_paths(), vec![leaf.join("cgroup.procs")]);
    cg.add_process(4242)?;
    assert_eq!(read(leaf.join("cgroup.procs"))?, "4242");
    assert_eq!(cg.pids()?, vec![4242]);
    Ok(())
}

#[test]
fn v2_existing_delegation_is_left_alone_and_update_writes_max_forms() -> TestResult {
    // root and tug/ already delegate everything (as the kernel shows it: no '+')
    let (dir, driver) = fake_v2("cpu memory pids\n", "cpu io memory pids\n")?;
    let root = dir.path();
    fs::create_dir(root.join("tug"))?;
    write(root.join("tug/cgroup.subtree_control"), "memory pids cpu\n")?;
    // what the kernel puts in a new cgroup with swap accounting
    fs::create_dir(root.join("tug/c1"))?;
    write(root.join("tug/c1/memory.swap.max"), "max\n")?;

    let cg = Cgroup::create(&driver, "tug/c1", &limits())?;
    assert_eq!(
        read(root.join("cgroup.subtree_control"))?,
        "cpu io memory pids"
    );
    assert_eq!(
        read(root.join("tug/cgroup.subtree_control"))?,
        "memory pids cpu"
    );
    let leaf = root.join("tug/c1");
    assert_eq!(read(leaf.join("memory.swap.max"))?, "0");

    cg.update(&Resources {
        memory_swap_off: false,
        cpu_weight: Some(10_000),
        cpu_quota: Some((-1, 20_000)),
        ..limits()
    })?;
    assert_eq!(read(leaf.join("memory.swap.max"))?, "max");
    assert_eq!(read(leaf.join("cpu.max"))?, "max 20000");
    assert_eq!(read(leaf.join("cpu.weight"))?, "10000");

    cg.update(&Resources::default())?;
    assert_eq!(read(leaf.join("memory.max"))?, "max");
    assert_eq!(read(leaf.join("memory.swap.max"))?, "0");
    assert_eq!(read(leaf.join("cpu.max"))?, "max 100000");
    assert_eq!(read(leaf.join("cpu.weight"))?, "100");
    assert_eq!(read(leaf.join("pids.max"))?, "max");

    // only root's subtree_control partly enabled: the missing ones are added
    let (dir, driver) = fake_v2("cpu memory pids\n", "memory\n")?;
    Cgroup::create(&driver, "c2", &limits())?;
    assert_eq!(
        read(dir.path().join("cgroup.subtree_control"))?,
        "+cpu +pids"
    );
    Ok(())
}

#[test]
fn v2_stats_read_the_kernel_files() -> TestResult {
    let (dir, driver) = fake_v2("cpu memory pids\n", "cpu memory pids\n")?;
    let cg = Cgroup::create(&driver, "tug/c1", &limits())?;
    let leaf = dir.path().join("tug/c1");
    write(
        leaf.join("cpu.stat"),
        "usage_usec 5000000\nuser_usec 3000000\nsystem_usec 2000000\nnr_periods 10\n\
         nr_throttled 4\nthrottled_usec 123456\nnr_bursts 0\nburst_usec 0\n",
    )?;
    write(leaf.join("memory.current"), "104857600\n")?;
    write(leaf.join("memory.peak"), "120000000\n")?;
    write(
        leaf.join("memory.stat"),
        "anon 73400320\nfile 31457280\nkernel 1048576\nkernel_stack 65536\npagetables 131072\n\
         sock 0\nshmem 0\nfile_mapped 4096000\nfile_dirty 20480\nfile_writeback 0\n\
         inactive_anon 0\nactive_anon 73400320\ninactive_file 20971520\nactive_file 10485760\n\
         unevictable 0\nslab_reclaimable 262144\nslab_unreclaimable 524288\npgfault 40705\n",
    )?;
    write(
        leaf.join("memory.events"),
        "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
    )?;
    write(leaf.join("pids.current"), "7\n")?;
    assert_eq!(
        cg.stats()?,
        Stats {
            cpu_usage_ns: 5_000_000_000,
            cpu_user_ns: 3_000_000_000,
            cpu_system_ns: 2_000_000_000,
            cpu_throttled_periods: 4,
            cpu_throttled_ns: 123_456_000,
            memory_usage: 104_857_600,
            memory_limit: Some(134_217_728),
            memory_max_usage: Some(120_000_000),
            memory_working_set: 104_857_600 - 20_971_520,
            memory_rss: 73_400_320,
            memory_cache: 31_457_280,
            oom_kills: 2,
            pids_current: 7,
            pids_limit: Some(20),
        }
    );
    write(leaf.join("memory.current"), "1000\n")?;
    fs::remove_file(leaf.join("memory.peak"))?;
    cg.update(&Resources::default())?;
    let stats = cg.stats()?;
    assert_eq!(stats.memory_working_set, 0, "saturates");
    assert_eq!(stats.memory_max_usage, None, "no memory.peak before 5.19");
    assert_eq!(stats.memory_limit, None);
    assert_eq!(stats.pids_limit, None);
    Ok(())
}

#[test]
fn v2_kill_all_uses_cgroup_kill_for_sigkill() -> TestResult {
    let (dir, driver) = fake_v2("cpu memory pids\n", "")?;
    let cg = Cgroup::create(&driver, "tug/c1", &limits())?;
    let leaf = dir.path().join("tug/c1");
    let child = ChildGuard::sleep()?;
    cg.add_process(child.pid()?)?;
    write(leaf.join("cgroup.kill"), "")?;
    cg.kill_all(Signal::SIGKILL)?;
    assert_eq!(read(leaf.join("cgroup.kill"))?, "1");
    // the fake kernel does nothing with it: the child was not signalled by us
    assert_eq!(
        nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(child.pid()?),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG)
        )?,
        nix::sys::wait::WaitStatus::StillAlive
    );

    // SIGTERM goes to every process even with cgroup.kill; so does SIGKILL before 5.14
    let mut child = child;
    cg.kill_all(Signal::SIGTERM)?;
    assert_eq!(child.wait_signal()?, Some(Signal::SIGTERM as i32));
    fs::remove_file(leaf.join("cgroup.kill"))?;
    let mut child = ChildGuard::sleep()?;
    cg.add_process(child.pid()?)?;
    cg.kill_all(Signal::SIGKILL)?;
    assert_eq!(child.wait_signal()?, Some(Signal::SIGKILL as i32));
    Ok(())
}

#[test]
fn v2_remove_is_idempotent_and_open_readopts() -> TestResult {
    let (dir, driver) = fake_v2("cpu memory pids\n", "")?;
    let cg = Cgroup::create(&driver, "tug/c1", &limits())?;
    let opened = Cgroup::open(&driver, "tug/c1")?;
    assert_eq!(opened.v2_dir(), cg.v2_dir());
    opened.remove()?;
    assert!(!cg.exists());
    cg.remove()?;
    assert_eq!(subdirs(dir.path())?, ["tug"]);
    let err = Cgroup::open(&driver, "tug/c1")
        .err()
        .ok_or("opened a removed cgroup")?;
    assert!(
        err.to_string().starts_with("cgroup tug/c1 does not exist"),
        "{err}"
    );
    assert_eq!(
        cg.pids()?,
        Vec::<i32>::new(),
        "a removed cgroup has no processes"
    );
    cg.kill_all(Signal::SIGKILL)?;
    Ok(())
}

#[test]
fn v2_invalid_input_or_missing_controllers_create_nothing() -> TestResult {
    let (dir, driver) = fake_v2("cpu memory pids\n", "")?;
    for bad in invalid_resources() {
        let err = Cgroup::create(&driver, "tug/c1", &bad)
            .err()
            .ok_or_else(|| format!("{bad:?} accepted"))?;
        assert!(err.is_invalid_input(), "{err}");
    }
    assert!(subdirs(dir.path())?.is_empty());
    assert_eq!(read(dir.path().join("cgroup.subtree_control"))?, "");

    let (dir, driver) = fake_v2("cpu memory io\n", "")?;
    let err = Cgroup::create(&driver, "tug/c1", &limits())
        .err()
        .ok_or("created without pids")?;
    assert_eq!(
        err.to_string(),
        format!(
            "{}/cgroup.controllers lacks pids: the cgroup v2 root does not offer them",
            dir.path().display()
        )
    );
    assert!(subdirs(dir.path())?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------- v1, the real kernel

mod real {
    //! Against /sys/fs/cgroup on this host (v1; CI runs as root on such a machine). Everything
    //! lives under `tug-test-<pid>-<n>` and goes away in `Scratch::drop`, also on failure.

    use std::io::Write as _;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A unique parent cgroup, its leaves and the processes spawned into them.
    struct Scratch {
        driver: CgroupDriver,
        parent: String,
        leaves: Vec<String>,
        children: Vec<Child>,
    }

    impl Scratch {
        fn new() -> TestResult<Self> {
            let driver = CgroupDriver::detect()?;
            let parent = format!(
                "tug-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            Ok(Scratch {
                driver,
                parent,
                leaves: Vec::new(),
                children: Vec::new(),
            })
        }

        fn create(&mut self, leaf: &str, resources: &Resources) -> TestResult<Cgroup> {
            let path = format!("{}/{leaf}", self.parent);
            self.leaves.push(path.clone());
            Ok(Cgroup::create(&self.driver, &path, resources)?)
        }

        /// Start `argv` inside `cg`: the child waits for a line on stdin, so it is in the
        /// cgroup before it does anything. Returns its index and pid.
        fn spawn_in(&mut self, cg: &Cgroup, argv: &[&str]) -> TestResult<(usize, i32)> {
            let mut child = Command::new("sh")
                .args(["-c", r#"read go && exec "$@""#, "sh"])
                .args(argv)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let stdin = child.stdin.take();
            let pid = i32::try_from(child.id())?;
            self.children.push(child);
            cg.add_process(pid)?;
            let mut stdin = stdin.ok_or("no stdin")?;
            writeln!(stdin, "go")?;
            Ok((self.children.len() - 1, pid))
        }

        fn wait(&mut self, index: usize) -> TestResult<ExitStatus> {
            Ok(self
                .children
                .get_mut(index)
                .ok_or("no such child")?
                .wait()?)
        }

        /// Kill what was spawned, remove every cgroup made, and check nothing is left in any
        /// hierarchy. Idempotent.
        fn cleanup(&mut self) -> TestResult {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.children.clear();
            let mut result: TestResult = Ok(());
            for leaf in self.leaves.drain(..).rev() {
                if let Ok(cg) = Cgroup::open(&self.driver, &leaf) {
                    let removed = cg.kill_all(Signal::SIGKILL).and_then(|()| cg.remove());
                    if let Err(e) = removed {
                        result = Err(e.into());
                    }
                }
            }
            if let Ok(cg) = Cgroup::open(&self.driver, &self.parent)
                && let Err(e) = cg.remove()
            {
                result = Err(e.into());
            }
            result?;
            if let CgroupDriver::V1 { mounts } = &self.driver {
                for (controller, mount) in mounts.iter() {
                    let dir = mount.join(&self.parent);
                    if dir.exists() {
                        return Err(format!("{controller}: {} left behind", dir.display()).into());
                    }
                }
            }
            Ok(())
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Err(e) = self.cleanup() {
                eprintln!("cleanup of cgroup {}: {e}", self.parent);
            }
        }
    }

    fn as_v1(cg: &Cgroup) -> TestResult<&v1::Cgroup> {
        match cg {
            Cgroup::V1(cg) => Ok(cg),
            Cgroup::V2(_) => Err("expected a v1 cgroup on this host".into()),
        }
    }

    #[test]
    fn real_detect_finds_v1_on_this_hybrid_host() -> TestResult {
        let driver = CgroupDriver::detect()?;
        let CgroupDriver::V1 { mounts } = &driver else {
            return Err(format!("expected v1, got {driver:?}").into());
        };
        for controller in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
            assert_eq!(
                mounts.get(controller),
                Some(Path::new("/sys/fs/cgroup").join(controller).as_path())
            );
        }
        Ok(())
    }

    #[test]
    fn real_v1_limits_membership_update_kill_and_remove() -> TestResult {
        let mut scratch = Scratch::new()?;
        let resources = Resources {
            memory_limit: Some(64 * MIB),
            memory_swap_off: true,
            cpu_quota: Some((50_000, 100_000)),
            cpu_weight: Some(500),
            pids_limit: Some(20),
        };
        let cg = scratch.create("limits", &resources)?;
        let v1 = as_v1(&cg)?;
        let mem = v1.dir("memory")?;
        let cpu = v1.dir("cpu")?;
        let pids = v1.dir("pids")?;
        assert_eq!(read(mem.join("memory.limit_in_bytes"))?, "67108864");
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes"))?, "67108864");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us"))?, "50000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us"))?, "100000");
        assert_eq!(
            read(cpu.join("cpu.shares"))?,
            weight_to_shares(500).to_string()
        );
        assert_eq!(read(pids.join("pids.max"))?, "20");

        let (index, pid) = scratch.spawn_in(&cg, &["sleep", "30"])?;
        assert!(cg.pids()?.contains(&pid), "{pid} not in {:?}", cg.pids()?);
        let stats = cg.stats()?;
        assert_eq!(stats.pids_current, 1, "{stats:?}");
        assert_eq!(stats.pids_limit, Some(20));
        assert_eq!(stats.memory_limit, Some(64 * MIB));
        // (pages the child touched before it moved stay charged to its old cgroup)
        assert!(stats.memory_working_set <= stats.memory_usage, "{stats:?}");

        // the kernel refuses limit > memsw: raising and lowering both need the right order
        for limit in [128 * MIB, 32 * MIB, 256 * MIB] {
            cg.update(&Resources {
                memory_limit: Some(limit),
                ..resources.clone()
            })?;
            assert_eq!(read(mem.join("memory.limit_in_bytes"))?, limit.to_string());
            assert_eq!(
                read(mem.join("memory.memsw.limit_in_bytes"))?,
                limit.to_string()
            );
        }
        cg.update(&Resources {
            memory_swap_off: false,
            cpu_quota: Some((20_000, 50_000)),
            ..resources.clone()
        })?;
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes"))?, V1_UNLIMITED);
        assert_eq!(read(cpu.join("cpu.cfs_quota_us"))?, "20000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us"))?, "50000");
        cg.update(&resources)?;
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes"))?, "67108864");
        cg.update(&Resources::default())?;
        assert_eq!(read(mem.join("memory.limit_in_bytes"))?, V1_UNLIMITED);
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes"))?, V1_UNLIMITED);
        assert_eq!(read(cpu.join("cpu.cfs_quota_us"))?, "-1");
        assert_eq!(read(cpu.join("cpu.shares"))?, "1024");
        assert_eq!(read(pids.join("pids.max"))?, "max");
        let stats = cg.stats()?;
        assert_eq!((stats.memory_limit, stats.pids_limit), (None, None));

        // an agent restart re-adopts it
        let adopted = Cgroup::open(&scratch.driver, cg.path())?;
        assert_eq!(adopted.pids()?, vec![pid]);

        adopted.kill_all(Signal::SIGKILL)?;
        assert_eq!(scratch.wait(index)?.signal(), Some(Signal::SIGKILL as i32));
        assert_eq!(read(v1.dir("freezer")?.join("freezer.state"))?, "THAWED");
        cg.remove()?;
        assert!(!cg.exists());
        for dir in v1.dirs() {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
        cg.remove()?;
        scratch.cleanup()
    }

    #[test]
    fn real_v1_memory_hog_is_oom_killed() -> TestResult {
        let mut scratch = Scratch::new()?;
        let cg = scratch.create(
            "hog",
            &Resources {
                memory_limit: Some(64 * MIB),
                pids_limit: Some(20),
                ..Resources::default()
            },
        )?;
        // tail keeps the newline-free line in memory until its end: 200 MiB > 64 MiB
        let (index, _) = scratch.spawn_in(
            &cg,
            &["sh", "-c", "head -c 200M /dev/zero | tail > /dev/null"],
        )?;
        let status = scratch.wait(index)?;
        assert!(!status.success(), "the hog survived: {status:?}");
        let stats = cg.stats()?;
        assert!(stats.oom_kills >= 1, "{stats:?}");
        let peak = stats.memory_max_usage.ok_or("no max usage")?;
        assert!(peak <= 64 * MIB, "{stats:?}");
        cg.remove()?;
        scratch.cleanup()
    }

    #[test]
    fn real_v1_pids_limit_stops_a_fork_bomb() -> TestResult {
        let mut scratch = Scratch::new()?;
        let cg = scratch.create(
            "forks",
            &Resources {
                pids_limit: Some(20),
                ..Resources::default()
            },
        )?;
        let (index, _) = scratch.spawn_in(
            &cg,
            &[
                "busybox",
                "sh",
                "-c",
                "for i in $(seq 50); do sleep 5 & done; wait",
            ],
        )?;
        // pids.events counts the forks the limit refused
        let events = as_v1(&cg)?.dir("pids")?.join("pids.events");
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            let text = read(&events)?;
            let refused: u64 = keyed(&text, "max").unwrap_or("0").parse()?;
            if refused > 0 || Instant::now() > deadline {
                break refused;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(refused > 0, "no fork was refused");
        let stats = cg.stats()?;
        assert!(stats.pids_current <= 20, "{stats:?}");
        assert!(cg.pids()?.len() <= 20);

        cg.kill_all(Signal::SIGKILL)?;
        let _ = scratch.wait(index)?;
        cg.remove()?;
        assert!(!cg.exists());
        scratch.cleanup()
    }
}
