//! A line every few seconds while a rank waits in the rendezvous (a blocking call into c10d), so
//! a job whose other ranks never start says what it is waiting for instead of hanging silently.
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

/// Prints `describe(waited so far)` on stderr every `every` until dropped.
pub struct WaitNotice {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WaitNotice {
    pub fn start(every: Duration, describe: impl Fn(Duration) -> String + Send + 'static) -> WaitNotice {
        let (stop, stopped) = bounded::<()>(0);
        let started = Instant::now();
        let thread = std::thread::spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => eprintln!("{}", describe(started.elapsed())),
                _ => return,
            }
        });
        WaitNotice { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for WaitNotice {
    fn drop(&mut self) {
        // Dropping the sender disconnects the channel: the thread returns at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
