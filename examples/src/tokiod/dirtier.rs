//! The background dirtier: a thread writing random scratch pages of the
//! store at a set rate (load for the benchmark), paused with the service
//! for the freeze and throttled when the migration policy asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::service::Memory;

#[derive(Debug, Default)]
struct Flags {
    pause: AtomicBool,
    paused: AtomicBool,
    /// Rate as a percentage of the configured one.
    percent: AtomicU8,
    stop: AtomicBool,
}

/// Pauses, resumes, throttles and stops a [`Dirtier`] from another thread.
#[derive(Clone, Debug)]
pub struct DirtierControl {
    flags: Arc<Flags>,
}

impl DirtierControl {
    /// Ask the dirtier to pause (it stops within about half a millisecond).
    pub fn request_pause(&self) {
        self.flags.pause.store(true, Ordering::SeqCst);
    }

    /// Wait until a requested pause took effect (bounded).
    pub fn wait_paused(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.flags.paused.load(Ordering::SeqCst) && !self.flags.stop.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return Err("the dirtier did not pause within 5 s".into());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    /// Write again, at the full rate.
    pub fn resume(&self) {
        self.flags.percent.store(100, Ordering::SeqCst);
        self.flags.pause.store(false, Ordering::SeqCst);
    }

    /// Write at `percent` % of the rate.
    pub fn throttle(&self, percent: u8) {
        self.flags.percent.store(percent.min(100), Ordering::SeqCst);
    }

    /// Stop for good (the thread ends).
    pub fn stop(&self) {
        self.flags.stop.store(true, Ordering::SeqCst);
    }
}

/// The dirtier's thread.
#[derive(Debug)]
pub struct Dirtier {
    control: DirtierControl,
    thread: JoinHandle<()>,
}

impl Dirtier {
    /// Dirty `mbps` MB/s of the store's scratch pages until stopped.
    pub fn spawn(memory: Memory, mbps: f64) -> std::io::Result<Self> {
        let control = DirtierControl {
            flags: Arc::new(Flags {
                percent: AtomicU8::new(100),
                ..Flags::default()
            }),
        };
        let flags = control.flags.clone();
        let thread = std::thread::Builder::new()
            .name("tokiod-dirtier".into())
            .spawn(move || run(&flags, &memory, mbps))?;
        Ok(Self { control, thread })
    }

    /// Its control.
    pub fn control(&self) -> DirtierControl {
        self.control.clone()
    }

    /// Stop it and wait for the thread.
    pub fn join(self) {
        self.control.stop();
        let _ = self.thread.join();
    }
}

fn run(flags: &Flags, memory: &Memory, mbps: f64) {
    let Ok(store) = memory.store() else {
        return;
    };
    let start = Instant::now();
    let mut done = 0f64;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut stamp = 0u64;
    while !flags.stop.load(Ordering::Relaxed) {
        if flags.pause.load(Ordering::SeqCst) {
            flags.paused.store(true, Ordering::SeqCst);
            while flags.pause.load(Ordering::SeqCst) && !flags.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
            }
            flags.paused.store(false, Ordering::SeqCst);
            continue;
        }
        let rate = mbps * 1e6 / 4096.0 * f64::from(flags.percent.load(Ordering::Relaxed)) / 100.0;
        let target = start.elapsed().as_secs_f64() * rate;
        while done < target {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            stamp += 1;
            store.dirty_scratch_page(seed, stamp);
            done += 1.0;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
