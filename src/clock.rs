//! Time comes from here, injected, so tests can step it and no code subtracts `SystemTime`s
//! that may go backwards (a wall clock that steps back must never panic).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as the daemon's clock reads it.
pub type Millis = i64;

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

pub type SharedClock = Arc<dyn Clock>;

/// Milliseconds since boot, counting time the machine spent suspended or paused (unlike
/// `Instant`, which stands still then): for deadlines another machine also keeps, such as a
/// lease, where a process that slept through its deadline must know it did.
pub fn boot_ms() -> i64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = rustix::time::ClockId::Boottime;
    // Elsewhere the monotonic clock (which on macOS and the BSDs' uptime clocks differs).
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let id = rustix::time::ClockId::Monotonic;
    let t = rustix::time::clock_gettime(id);
    t.tv_sec.saturating_mul(1000) + t.tv_nsec / 1_000_000
}

/// The wall clock. Before-epoch readings (a badly set machine) clamp to 0 instead of panicking.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0,
        }
    }
}

/// A clock tests set and step by hand; also reachable from the CLI's test hook
/// (`HOARD_CLOCK_OFFSET`), which skews the system clock by a fixed amount.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Millis) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(start)))
    }
    pub fn set(&self, ms: Millis) {
        self.0.store(ms, Ordering::SeqCst)
    }
    pub fn advance(&self, delta_ms: i64) {
        self.0.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system clock shifted by a fixed offset: how a daemon under test is run "in the future"
/// or "in the past" without faking time for the whole process.
pub struct OffsetClock(pub i64);

impl Clock for OffsetClock {
    fn now_ms(&self) -> Millis {
        SystemClock.now_ms().saturating_add(self.0)
    }
}

/// Milliseconds since the process started, from the monotonic clock (never steps).
pub struct MonoClock(std::time::Instant);

impl MonoClock {
    pub fn new() -> MonoClock {
        MonoClock(std::time::Instant::now())
    }
}

impl Default for MonoClock {
    fn default() -> MonoClock {
        MonoClock::new()
    }
}

impl Clock for MonoClock {
    fn now_ms(&self) -> Millis {
        i64::try_from(self.0.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// Cache time: the one clock every age in the index is measured by (invariant 3).
///
/// It follows the wall clock while the wall clock behaves, but it never steps: it never goes
/// backwards and, between two readings, it advances by at least half and at most twice the time
/// the monotonic clock says passed. A wall clock stepped back by hours makes cache time run at
/// half speed until they meet (ages stop growing as fast; nothing expires early); stepped forward,
/// cache time runs at double speed until it catches up (hours of expiry spread over hours, never
/// a mass eviction at one instant). A restarted daemon resumes from the last cache time it
/// journaled, so a clock that changed while it was stopped is absorbed the same way.
pub struct CacheClock {
    wall: SharedClock,
    mono: SharedClock,
    state: std::sync::Mutex<CacheState>,
}

#[derive(Clone, Copy, Debug)]
struct CacheState {
    now: Millis,
    mono: Millis,
    /// The wall clock at the last reading: a step is the wall clock moving by more (or less)
    /// than the monotonic clock between two readings.
    wall: Millis,
    /// Set while cache time and the wall clock disagree (one line when they meet again).
    diverged: bool,
}

impl CacheClock {
    /// `floor`: the last cache time this data directory saw (0 for a new one).
    pub fn new(wall: SharedClock, mono: SharedClock, floor: Millis) -> CacheClock {
        let w = wall.now_ms();
        let start = if floor > w {
            tracing::warn!(
                wall = %rfc3339(w),
                last_seen = %rfc3339(floor),
                "the wall clock is behind the last time this cache saw; cache time resumes from \
                 there and runs at half speed until the wall clock catches up"
            );
            floor
        } else if floor > 0 && w - floor > 60_000 {
            tracing::info!(
                wall = %rfc3339(w),
                last_seen = %rfc3339(floor),
                "the wall clock moved on while hoard was stopped; cache time catches up at up to \
                 twice real speed instead of ageing everything at once"
            );
            floor
        } else {
            w
        };
        let m = mono.now_ms();
        CacheClock {
            wall,
            mono,
            state: std::sync::Mutex::new(CacheState {
                now: start,
                mono: m,
                wall: w,
                diverged: start != w,
            }),
        }
    }

    /// The system clocks, with the test hook `HOARD_CLOCK_OFFSET` (e.g. `-3h`) applied to the
    /// wall clock.
    pub fn system(offset_ms: i64, floor: Millis) -> CacheClock {
        let wall: SharedClock = if offset_ms == 0 {
            Arc::new(SystemClock)
        } else {
            Arc::new(OffsetClock(offset_ms))
        };
        CacheClock::new(wall, Arc::new(MonoClock::new()), floor)
    }

    /// How far the wall clock is from cache time right now (positive: wall ahead).
    pub fn wall_offset(&self) -> i64 {
        let now = self.now_ms();
        self.wall.now_ms().saturating_sub(now)
    }
}

impl Clock for CacheClock {
    fn now_ms(&self) -> Millis {
        let wall = self.wall.now_ms();
        let mono = self.mono.now_ms();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = mono.saturating_sub(s.mono).max(0);
        if elapsed == 0 {
            return s.now;
        }
        let lo = s.now.saturating_add(elapsed / 2);
        let hi = s.now.saturating_add(elapsed.saturating_mul(2));
        let next = wall.clamp(lo, hi);
        let off = wall.saturating_sub(next);
        // A warning when the wall clock jumps against the monotonic clock while hoard runs (an
        // operator or NTP stepped it); downtime is logged at start, as information.
        let step = wall.saturating_sub(s.wall).saturating_sub(elapsed);
        if step.abs() > 1000 {
            s.diverged = true;
            tracing::warn!(
                step_ms = step,
                offset_ms = off,
                "the wall clock stepped while hoard ran; cache time is converging to it gradually"
            );
        } else if off == 0 && s.diverged {
            s.diverged = false;
            tracing::info!("cache time has converged with the wall clock");
        }
        s.now = next;
        s.mono = mono;
        s.wall = wall;
        next
    }
}

/// RFC 3339 UTC text for a millisecond timestamp (for logs and JSON; no calendar crate needed).
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    fn cache_clock(
        wall: Millis,
        floor: Millis,
    ) -> (Arc<ManualClock>, Arc<ManualClock>, CacheClock) {
        let w = ManualClock::new(wall);
        let m = ManualClock::new(0);
        let c = CacheClock::new(w.clone(), m.clone(), floor);
        (w, m, c)
    }

    const H: i64 = 3_600_000;

    #[test]
    fn cache_time_follows_a_well_behaved_wall_clock() {
        let (w, m, c) = cache_clock(10 * H, 0);
        assert_eq!(c.now_ms(), 10 * H);
        for _ in 0..100 {
            w.advance(1000);
            m.advance(1000);
            assert_eq!(c.now_ms(), w.now_ms());
        }
    }

    #[test]
    fn a_backward_step_never_moves_cache_time_back() {
        let (w, m, c) = cache_clock(10 * H, 0);
        w.advance(-3 * H);
        m.advance(1000);
        let t1 = c.now_ms();
        assert_eq!(
            t1,
            10 * H + 500,
            "half speed while the wall clock is behind"
        );
        // Converges once the wall clock has caught up (6 h of real time at half speed).
        for _ in 0..(7 * 60) {
            w.advance(60_000);
            m.advance(60_000);
            let t = c.now_ms();
            assert!(t >= t1);
        }
        assert_eq!(c.now_ms(), w.now_ms());
    }

    #[test]
    fn a_forward_step_is_spread_over_time() {
        let (w, m, c) = cache_clock(10 * H, 0);
        w.advance(5 * H);
        m.advance(60_000);
        assert_eq!(c.now_ms(), 10 * H + 120_000, "at most twice real speed");
        for _ in 0..(6 * 60) {
            w.advance(60_000);
            m.advance(60_000);
            c.now_ms();
        }
        assert_eq!(c.now_ms(), w.now_ms());
    }

    #[test]
    fn restart_resumes_from_the_journaled_time() {
        // Wall clock 3 h behind what the cache last saw: resume there.
        let (_, _, c) = cache_clock(7 * H, 10 * H);
        assert_eq!(c.now_ms(), 10 * H);
        // Wall clock 3 h ahead (stopped for a while, or stepped): resume there too, catch up.
        let (w, m, c) = cache_clock(13 * H, 10 * H);
        assert_eq!(c.now_ms(), 10 * H);
        m.advance(1000);
        w.advance(1000);
        assert_eq!(c.now_ms(), 10 * H + 2000);
    }

    #[test]
    fn manual_clock_steps_both_ways() {
        let c = ManualClock::new(1000);
        c.advance(-5000);
        assert_eq!(c.now_ms(), -4000);
        c.set(7);
        assert_eq!(c.now_ms(), 7);
    }
}
