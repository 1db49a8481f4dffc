//! An uploaded file still arriving, as its import job reads it: the job converts while the
//! request stages the body, instead of after (the two take about as long, so an import of a
//! file uploaded at disk speed takes about half the time).
//!
//! The request writes the body to the staged file and says how far it got ([`Arriving::wrote`]);
//! a read waits until its bytes are in the file. When the body ends, the request inspects the
//! whole file and gives its verdict ([`Arriving::accept`] or [`Arriving::refuse`]); a broken
//! body is refused too, with its reason. The job starts on the claimed format's own
//! checks ([`kagami_images::format::inspect_claimed`]: the search for other formats'
//! signatures needs the file's end) and commits nothing before the verdict accepts: a refused
//! or broken upload fails its job with the request's reason, and the blocks it wrote are
//! unreferenced, for GC.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};

use kagami_images::format::ReadAt;
use uuid::Uuid;

use crate::error::ApiError;

/// The uploads still arriving or awaiting their job, by job id.
static ARRIVING: LazyLock<Mutex<HashMap<Uuid, Arc<Arriving>>>> = LazyLock::new(Mutex::default);

/// One upload's staged file and how far it got.
#[derive(Debug)]
pub struct Arriving {
    file: std::fs::File,
    /// The length the request declared (Content-Length), if it did.
    declared: Option<u64>,
    state: Mutex<State>,
    changed: Condvar,
    /// Told when the verdict is given, for async waiters ([`Arriving::refusal`]).
    decided: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    written: u64,
    /// The whole body is in the file.
    ended: bool,
    /// Set once the whole file was inspected (accepted, or why not), or the upload failed.
    verdict: Option<Result<(), Refusal>>,
    /// The nearest end a read waits for: [`Arriving::wrote`] wakes readers only once it is
    /// reached, not for every chunk (a futex wake and a context switch each).
    awaited: Option<u64>,
}

/// Why an upload was not accepted: the error the request answered, for its job to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl From<&ApiError> for Refusal {
    fn from(e: &ApiError) -> Refusal {
        Refusal {
            code: e.code_and_status().0,
            message: e.to_string(),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        ApiError::bad(r.code, r.message)
    }
}

impl Arriving {
    /// Registers job `id`'s upload, staged in `file` (opened for reading).
    pub fn register(id: Uuid, file: std::fs::File, declared: Option<u64>) -> Arc<Arriving> {
        let arriving = Arc::new(Arriving {
            file,
            declared,
            state: Mutex::default(),
            changed: Condvar::new(),
            decided: tokio::sync::Notify::new(),
        });
        registry().insert(id, arriving.clone());
        arriving
    }

    /// Job `id`'s upload, if it is still arriving or its job has not run yet (not after a
    /// restart: the job then reads its staged file, whole).
    pub fn of(id: Uuid) -> Option<Arc<Arriving>> {
        registry().get(&id).cloned()
    }

    /// Forgets job `id`'s upload (its job ended).
    pub fn forget(id: Uuid) {
        registry().remove(&id);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state());
        self.changed.notify_all();
        self.decided.notify_waiters();
    }

    /// The first `written` bytes are in the file.
    pub fn wrote(&self, written: u64) {
        let mut s = self.state();
        s.written = written;
        if s.awaited.is_some_and(|end| written >= end) {
            s.awaited = None;
            drop(s);
            self.changed.notify_all();
        }
    }

    /// The whole body, `len` bytes, is in the file.
    pub fn ended(&self, len: u64) {
        self.update(|s| {
            s.written = len;
            s.ended = true;
        });
    }

    /// The whole file passed the inspector.
    pub fn accept(&self) {
        self.update(|s| s.verdict = Some(Ok(())));
    }

    /// The upload broke or the whole file was refused: reads fail from now on, and the job
    /// reports `why`.
    pub fn refuse(&self, why: Refusal) {
        self.update(|s| s.verdict = Some(Err(why)));
    }

    /// The request's verdict, if given yet.
    pub fn verdict_now(&self) -> Option<Result<(), Refusal>> {
        self.state().verdict.clone()
    }

    /// Waits until the upload is refused; never returns if it is accepted.
    pub async fn refusal(&self) -> Refusal {
        loop {
            let decided = self.decided.notified();
            tokio::pin!(decided);
            // Registered before the check: a verdict given in between still wakes us.
            decided.as_mut().enable();
            match self.verdict_now() {
                Some(Err(why)) => return why,
                Some(Ok(())) => std::future::pending::<()>().await,
                None => decided.await,
            }
        }
    }

    /// Waits for the request's verdict on the whole file. Blocking.
    pub fn verdict(&self) -> Result<(), Refusal> {
        let mut s = self.state();
        loop {
            if let Some(v) = &s.verdict {
                return v.clone();
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until the first `end` bytes are in the file (or the body ended, or was refused).
    fn wait_for(&self, end: u64) -> io::Result<()> {
        let mut s = self.state();
        loop {
            if let Some(Err(why)) = &s.verdict {
                return Err(io::Error::other(why.message.clone()));
            }
            if s.ended || s.written >= end {
                return Ok(());
            }
            s.awaited = Some(s.awaited.map_or(end, |other| other.min(end)));
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Held by the request while it owes its upload a verdict: if it ends without giving one (a
/// panic), the upload is refused, so its job never waits forever.
pub struct VerdictDue(pub Arc<Arriving>);

impl Drop for VerdictDue {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.verdict.get_or_insert_with(|| {
                Err(Refusal {
                    code: "internal",
                    message: "the upload's request ended without a verdict; upload again".into(),
                })
            });
        });
    }
}

fn registry() -> MutexGuard<'static, HashMap<Uuid, Arc<Arriving>>> {
    ARRIVING.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an import job reads while its upload arrives. Blocking reads.
pub struct ArrivingFile(pub Arc<Arriving>);

impl ReadAt for ArrivingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset.saturating_add(buf.len() as u64);
        // Never past the declared end: a read there waits for the body's end, then is short.
        let end = self.0.declared.map_or(end, |d| end.min(d));
        self.0.wait_for(end)?;
        self.0.file.read_at(buf, offset)
    }

    /// The declared length, or the length once the body ended.
    fn size(&self) -> io::Result<u64> {
        if let Some(len) = self.0.declared {
            return Ok(len);
        }
        self.0.wait_for(u64::MAX)?;
        self.0.file.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn reads_wait_for_their_bytes_and_fail_with_the_upload() {
        let mut staged = tempfile::NamedTempFile::new().expect("temp");
        let id = Uuid::new_v4();
        let arriving = Arriving::register(id, staged.reopen().expect("reopen"), Some(8));
        let reader = ArrivingFile(arriving.clone());
        assert_eq!(reader.size().expect("size"), 8);
        let waiting = std::thread::spawn(move || {
            let mut buf = [0u8; 4];
            let n = reader.read_at(&mut buf, 2).expect("read");
            (n, buf)
        });
        staged.write_all(b"abc").expect("write");
        arriving.wrote(3);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "bytes 2..6 are not all there yet");
        staged.write_all(b"defgh").expect("write");
        arriving.wrote(8);
        assert_eq!(waiting.join().expect("reader"), (4, *b"cdef"));
        assert!(Arriving::of(id).is_some());

        // A refusal fails every read and is the verdict.
        arriving.ended(8);
        let why = Refusal {
            code: "backing_file",
            message: "refused: backing file".into(),
        };
        arriving.refuse(why.clone());
        let reader = ArrivingFile(Arriving::of(id).expect("registered"));
        let err = reader.read_at(&mut [0u8; 1], 0).expect_err("refused");
        assert!(err.to_string().contains("backing file"), "{err}");
        assert_eq!(arriving.verdict(), Err(why));
        Arriving::forget(id);
        assert!(Arriving::of(id).is_none());
    }

    /// Readers waiting for different ends each wake once their own bytes are in, not before.
    #[test]
    fn readers_waiting_for_different_ends_each_wake_when_theirs_are_in() {
        let mut staged = tempfile::NamedTempFile::new().expect("temp");
        staged.write_all(&[7u8; 300]).expect("write");
        let arriving = Arriving::register(Uuid::new_v4(), staged.reopen().expect("reopen"), None);
        let read = |at: u64| {
            let reader = ArrivingFile(arriving.clone());
            std::thread::spawn(move || reader.read_at(&mut [0u8; 10], at).expect("read"))
        };
        let (near, far) = (read(90), read(190));
        std::thread::sleep(Duration::from_millis(50));
        arriving.wrote(150);
        assert_eq!(near.join().expect("near reader"), 10);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!far.is_finished(), "bytes 190..200 are not in yet");
        arriving.wrote(250);
        assert_eq!(far.join().expect("far reader"), 10);
    }

    #[tokio::test]
    async fn a_refusal_wakes_an_async_waiter_and_an_acceptance_never_does() {
        let staged = tempfile::NamedTempFile::new().expect("temp");
        let refused = Arriving::register(Uuid::new_v4(), staged.reopen().expect("reopen"), None);
        let waiter = tokio::spawn({
            let refused = refused.clone();
            async move { refused.refusal().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        refused.refuse(Refusal {
            code: "format_ambiguous",
            message: "refused".into(),
        });
        let why = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(why.code, "format_ambiguous");
        let accepted = Arriving::register(Uuid::new_v4(), staged.reopen().expect("reopen"), None);
        accepted.accept();
        let waited = tokio::time::timeout(Duration::from_millis(100), accepted.refusal()).await;
        assert!(waited.is_err(), "an accepted upload is never refused");
    }

    #[test]
    fn a_request_that_ends_without_a_verdict_refuses_its_upload() {
        let staged = tempfile::NamedTempFile::new().expect("temp");
        let arriving = Arriving::register(Uuid::new_v4(), staged.reopen().expect("reopen"), None);
        drop(VerdictDue(arriving.clone()));
        assert_eq!(arriving.verdict().expect_err("refused").code, "internal");
        // Given, a verdict stands.
        let given = Arriving::register(Uuid::new_v4(), staged.reopen().expect("reopen"), None);
        let due = VerdictDue(given.clone());
        given.accept();
        drop(due);
        assert_eq!(given.verdict(), Ok(()));
    }

    #[test]
    fn a_broken_upload_wakes_its_readers_with_the_reason() {
        let staged = tempfile::NamedTempFile::new().expect("temp");
        let arriving = Arriving::register(Uuid::new_v4(), staged.reopen().expect("reopen"), None);
        let reader = ArrivingFile(arriving.clone());
        let waiting = std::thread::spawn(move || reader.size());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiting.is_finished(),
            "no declared size: the size waits for the end"
        );
        let why = Refusal::from(&ApiError::bad(
            "upload_interrupted",
            "the upload broke after 3 bytes",
        ));
        arriving.refuse(why.clone());
        let err = waiting.join().expect("reader").expect_err("broken");
        assert!(err.to_string().contains("broke after 3 bytes"), "{err}");
        assert_eq!(arriving.verdict(), Err(why));
    }
}
