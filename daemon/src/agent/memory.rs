//! Gives back the pages of code an idle agent no longer runs.
//!
//! An idle agent holds about 1 MiB of data; the rest of its resident memory
//! is code mapped from popupd, libc and the plugins. The kernel maps file
//! pages in large blocks around each page first touched (fault-around, and
//! large page-cache folios), so start-up (config, TLS, D-Bus, SQLite,
//! plugins) leaves nearly all of the binary mapped, although an idle agent
//! runs a small part of it.
//!
//! [`release_code_pages`] drops those mappings. The pages stay in the page
//! cache, where the kernel can reclaim them; code that runs again is mapped
//! back by an ordinary minor fault. The agent calls it when its link has
//! been quiet for a keepalive period after any traffic, so an idle agent
//! holds only what it runs while idle. Figures in docs/performance.md.

use std::io;

/// Drops the page mappings of every private, read-only, file-backed
/// mapping that holds no page of its own (no copy-on-write page, such as
/// relocated data). Returns how many bytes were mapped there before.
#[allow(unsafe_code)]
pub fn release_code_pages() -> io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in clean_file_mappings(&smaps) {
        // SAFETY: `m` is a whole private mapping of a file, not writable,
        // with no anonymous (copied) page: every page is an unmodified copy
        // of the file. MADV_DONTNEED only removes the page-table entries;
        // the next access maps the same bytes again from the page cache. No
        // Rust object lives in these pages (they are code and constants),
        // and no other thread of the agent maps or remaps files meanwhile:
        // plugins are loaded once, at start, and the only later library
        // loads (glibc's name-service modules, by the first lookup of the
        // home's name) are done before the link's first session, which is
        // where this is called from.
        let advised = unsafe {
            rustix::mm::madvise(m.start as *mut _, m.len, rustix::mm::Advice::LinuxDontNeed)
        };
        if advised.is_ok() {
            released += m.resident;
        }
    }
    Ok(released)
}

#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    len: usize,
    /// Resident bytes, from the `Rss:` line.
    resident: usize,
}

/// The mappings of a `/proc/PID/smaps` text that can be released.
fn clean_file_mappings(smaps: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read, and whether it can still be released.
    let mut cur: Option<(Mapping, bool)> = None;
    for line in smaps.lines() {
        let mut f = line.split_ascii_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            // A header: "start-end perms offset dev inode [path]".
            let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            out.extend(cur.take().filter(|(_, ok)| *ok).map(|(m, _)| m));
            let perms = f.next().unwrap_or("").as_bytes();
            let path = f.nth(3).unwrap_or("");
            let ok = matches!(perms, [b'r', b'-', _, b'p']) && path.starts_with('/');
            let m = Mapping {
                start,
                len: end.saturating_sub(start),
                resident: 0,
            };
            cur = Some((m, ok));
        } else if let Some((m, ok)) = cur.as_mut() {
            let kib: usize = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match first {
                "Rss:" => m.resident = kib * 1024,
                // A copied page (relocated data, a debugger's breakpoint)
                // is not in the file, and a locked one is meant to stay:
                // such a mapping is kept whole.
                "Anonymous:" | "Locked:" if kib > 0 => *ok = false,
                _ => {}
            }
        }
    }
    out.extend(cur.filter(|(_, ok)| *ok).map(|(m, _)| m));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5585a0000000-5585a0100000 r--p 00000000 fe:01 123 /usr/bin/popupd
Rss:                 900 kB
Anonymous:             0 kB
Locked:                0 kB
5585a0100000-5585a0700000 r-xp 00100000 fe:01 123 /usr/bin/popupd
Rss:                5700 kB
Anonymous:             0 kB
5585a0700000-5585a0780000 r--p 00700000 fe:01 123 /usr/bin/popupd
Rss:                 400 kB
Anonymous:           120 kB
5585a0780000-5585a0790000 rw-p 00780000 fe:01 123 /usr/bin/popupd
Rss:                  64 kB
Anonymous:            64 kB
5585a1000000-5585a1100000 rw-p 00000000 00:00 0 [heap]
Rss:                 120 kB
Anonymous:           120 kB
7f0000000000-7f0000100000 r-xp 00028000 fe:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1000 kB
Anonymous:             4 kB
7f0000200000-7f0000300000 r-xp 00000000 fe:01 78 /usr/lib/popupd/plugins/libpopupd_notify.so
Rss:                 800 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_file_mappings_are_released() {
        let got = clean_file_mappings(SMAPS);
        assert_eq!(
            got,
            vec![
                Mapping {
                    start: 0x5585a0000000,
                    len: 0x100000,
                    resident: 900 * 1024
                },
                Mapping {
                    start: 0x5585a0100000,
                    len: 0x600000,
                    resident: 5700 * 1024
                },
                Mapping {
                    start: 0x7f0000200000,
                    len: 0x100000,
                    resident: 800 * 1024
                },
            ],
            "relocated data, writable data, the heap, a patched libc and the vdso stay"
        );
    }

    #[test]
    fn releasing_lowers_resident_memory_and_code_still_runs() {
        let rss = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = s
                .lines()
                .find(|l| l.starts_with("RssFile:"))
                .unwrap()
                .to_string();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
        };
        let before = rss();
        let released = release_code_pages().unwrap();
        assert!(released > 0, "a test binary has code mapped from its file");
        assert!(rss() < before, "file-backed RSS fell from {before} kB");
        // Code and constants come back on use.
        assert_eq!(format!("{:?}", Some(41 + 1)), "Some(42)");
    }
}
