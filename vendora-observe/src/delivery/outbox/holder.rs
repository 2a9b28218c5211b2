//! Relay ids that name their process, so that a relay on the same machine can tell rows
//! leased to a process that is gone (killed, crashed) and take them back at once instead of
//! waiting out their lease.
//!
//! An id is `p:{boot}:{pid namespace}:{pid}:{start}:{random}`: the machine's boot id, the
//! process's pid namespace, its pid and its start time (clock ticks since boot, so a reused
//! pid is told apart), then 12 random hex digits that make each identity of a relay (it
//! takes a new one after a database failure) unique. Only a relay of the same boot and pid
//! namespace judges it; any other id (another machine, another container's namespace, ids
//! of older versions: plain UUIDs) is never judged gone, and its rows wait for their lease.
//! Linux only; elsewhere ids are UUIDs.

/// A new relay id: naming this process where it can be judged, a UUID otherwise.
pub(super) fn new_relay_id() -> String {
    let id = uuid::Uuid::now_v7();
    match Process::current() {
        // The last 12 hex digits of a v7 UUID are random bits.
        Some(me) => format!(
            "p:{}:{}:{}:{}:{}",
            me.boot,
            me.namespace,
            me.pid,
            me.start,
            &id.simple().to_string()[20..]
        ),
        None => id.to_string(),
    }
}

/// What is known of the process behind a relay id.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Holder {
    /// A process of this machine and pid namespace that is gone: its pid.
    Gone(u32),
    /// This process, or one of this machine and pid namespace that still runs.
    Running,
    /// Nothing: another machine or namespace, a process hidden from us, an id of another
    /// form.
    Unknown,
}

/// Judges the process behind the relay `id`.
pub(super) fn judge(id: &str) -> Holder {
    let Some(me) = Process::current() else {
        return Holder::Unknown;
    };
    let parse = || {
        let mut parts = id.strip_prefix("p:")?.split(':');
        Some((
            parts.next()?,
            parts.next()?.parse::<u64>().ok()?,
            parts.next()?.parse::<u32>().ok()?,
            parts.next()?.parse::<u64>().ok()?,
        ))
    };
    let Some((boot, namespace, pid, start)) = parse() else {
        return Holder::Unknown;
    };
    if boot != me.boot || namespace != me.namespace {
        return Holder::Unknown;
    }
    if pid == me.pid {
        return Holder::Running;
    }
    match running(pid) {
        Running::No => Holder::Gone(pid),
        // The pid was taken again by a later process.
        Running::Since(s) if s != start => Holder::Gone(pid),
        Running::Since(_) => Holder::Running,
        Running::Unknown => Holder::Unknown,
    }
}

struct Process {
    boot: String,
    namespace: u64,
    pid: u32,
    start: u64,
}

enum Running {
    No,
    /// Running, started at this many clock ticks after boot.
    Since(u64),
    /// Running (or not visible to us): its start time is unknown.
    Unknown,
}

impl Process {
    #[cfg(target_os = "linux")]
    fn current() -> Option<Process> {
        use std::sync::OnceLock;
        static ME: OnceLock<Option<(String, u64, u64)>> = OnceLock::new();
        let pid = std::process::id();
        // The pid changes in a forked child; the rest is read once.
        let (boot, namespace, start) = ME
            .get_or_init(|| {
                let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
                let boot: String = boot.trim().chars().filter(|c| *c != '-').take(12).collect();
                let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
                let namespace = link
                    .to_str()?
                    .strip_prefix("pid:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()?;
                let start = start_time(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
                (boot.len() == 12).then_some((boot, namespace, start))
            })
            .clone()?;
        Some(Process {
            boot,
            namespace,
            pid,
            start,
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn current() -> Option<Process> {
        None
    }
}

/// Whether process `pid` runs (in this pid namespace), and since when.
#[cfg(target_os = "linux")]
fn running(pid: u32) -> Running {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return Running::Unknown;
    };
    // Signal 0: no signal is sent; ESRCH says that no such process exists. (EPERM: it
    // exists, but is another user's.)
    // SAFETY: kill(2) with signal 0 only checks the pid; it reads and writes no memory.
    let alive = unsafe { libc::kill(raw, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !alive {
        return Running::No;
    }
    // /proc may hide other users' processes (hidepid): then the start time is unknown.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Running::Unknown;
    };
    // A zombie (killed, not yet reaped by its parent) runs no more code.
    if matches!(fields(&stat).and_then(|mut f| f.next()), Some("Z" | "X")) {
        return Running::No;
    }
    match start_time(&stat) {
        Some(start) => Running::Since(start),
        None => Running::Unknown,
    }
}

#[cfg(not(target_os = "linux"))]
fn running(_pid: u32) -> Running {
    Running::Unknown
}

/// The fields of `/proc/PID/stat` from the third (the state) on: the command name (the
/// second) may hold spaces and parentheses, so they start after its closing parenthesis.
fn fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.get(stat.rfind(')')? + 1..)?.split_whitespace())
}

/// Field 22 of `/proc/PID/stat`, the start time.
fn start_time(stat: &str) -> Option<u64> {
    fields(stat)?.nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 \
                    987654 1000 200 18446744073709551615";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("4242 (cut"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_relay_id_names_this_process_which_runs() {
        let id = new_relay_id();
        assert!(id.starts_with("p:"), "{id}");
        assert!(id.len() <= 64, "{id} does not fit claimed_by");
        assert_ne!(
            new_relay_id(),
            id,
            "two identities of one process are one id"
        );
        // This process, and ids that cannot be judged here.
        assert_eq!(judge(&id), Holder::Running);
        assert_eq!(
            judge("0195f6a0-7c1e-7000-8000-000000000000"),
            Holder::Unknown
        );
        assert_eq!(judge("killed-relay"), Holder::Unknown);
        let other_boot = format!("p:000000000000{}", &id[14..]);
        assert_eq!(judge(&other_boot), Holder::Unknown);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_killed_process_not_yet_reaped_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(matches!(running(pid), Running::Since(_)));
        child.kill().unwrap();
        // Killed and not reaped (no wait yet): a zombie, once the kernel has ended it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !matches!(running(pid), Running::No) {
            assert!(std::time::Instant::now() < deadline, "the zombie runs");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_relay_whose_process_exited_or_whose_pid_was_reused_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let me = Process::current().unwrap();
        let id = |pid: u32, start: u64| {
            format!("p:{}:{}:{pid}:{start}:000000000000", me.boot, me.namespace)
        };
        assert_eq!(judge(&id(pid, 1)), Holder::Gone(pid));
        // A running process (pid 1), named with another start time: the pid was reused.
        let init = match running(1) {
            Running::Since(start) => start,
            _ => return,
        };
        assert_eq!(judge(&id(1, init)), Holder::Running);
        assert_eq!(judge(&id(1, init + 1)), Holder::Gone(1));
    }
}
