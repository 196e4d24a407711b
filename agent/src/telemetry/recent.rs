//! The agent's last warnings and errors, for `/status`: a tracing layer that
//! keeps the newest [`KEPT`] WARN/ERROR events in a ring, each message cut at
//! [`MAX_MESSAGE`] bytes. Bounded both ways, so a flood of failures costs a
//! fixed few KiB, and an operator sees what went wrong without the logs.

use std::{
    collections::VecDeque,
    fmt::{self, Write as _},
    sync::{Arc, Mutex, OnceLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{
    Layer,
    filter::{Filtered, LevelFilter},
    layer::Context,
};

use super::stamp::Stamp;

/// Events kept.
pub(super) const KEPT: usize = 10;
/// Bytes of one event's text kept (fields included), cut at a character.
pub(super) const MAX_MESSAGE: usize = 512;

/// One WARN or ERROR event, as `/status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEvent {
    pub time: Stamp,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The module that logged it, e.g. `damselfly_tracker::client`.
    pub target: String,
    /// The message and its fields (`key=value`), as the log line has them.
    pub message: String,
}

/// The ring; clones share it.
#[derive(Clone, Default)]
pub struct RecentErrors(Arc<Mutex<VecDeque<LogEvent>>>);

impl RecentErrors {
    /// The process's ring, fed by the layer the logging setup installs.
    pub fn global() -> &'static RecentErrors {
        static GLOBAL: OnceLock<RecentErrors> = OnceLock::new();
        GLOBAL.get_or_init(RecentErrors::default)
    }

    /// The layer that records into this ring (WARN and ERROR only).
    pub fn layer<S: Subscriber>(&self) -> Filtered<Recorder, LevelFilter, S> {
        Recorder(self.clone()).with_filter(LevelFilter::WARN)
    }

    /// Oldest first.
    pub fn events(&self) -> Vec<LogEvent> {
        self.lock().iter().cloned().collect()
    }

    fn push(&self, e: LogEvent) {
        let mut ring = self.lock();
        if ring.len() >= KEPT {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<LogEvent>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// See [`RecentErrors::layer`].
pub struct Recorder(RecentErrors);

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut text = Bounded::default();
        event.record(&mut Fields(&mut text));
        self.0.push(LogEvent {
            time: Stamp::from(SystemTime::now()),
            level: if *meta.level() == Level::ERROR {
                "ERROR"
            } else {
                "WARN"
            }
            .to_string(),
            target: meta.target().to_string(),
            message: text.0,
        });
    }
}

/// A string that stops growing at [`MAX_MESSAGE`] bytes, ending in `…` when
/// something was cut; formatting a huge field never allocates past that.
#[derive(Default)]
struct Bounded(String);

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        const ELLIPSIS: char = '…';
        let room = MAX_MESSAGE - ELLIPSIS.len_utf8();
        if self.0.len() > room {
            // Already cut: nothing more goes in.
            return Ok(());
        }
        if self.0.len() + s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut end = room - self.0.len();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push_str(&s[..end]);
        self.0.push(ELLIPSIS);
        Ok(())
    }
}

/// The message first, then the other fields as `key=value`.
struct Fields<'a>(&'a mut Bounded);

impl Fields<'_> {
    fn separate(&mut self) {
        if !self.0.0.is_empty() {
            let _ = self.0.write_char(' ');
        }
    }
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.separate();
        if field.name() == "message" {
            let _ = self.0.write_str(value);
        } else {
            let _ = write!(self.0, "{}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.separate();
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing::{error, info, warn};
    use tracing_subscriber::{layer::SubscriberExt, registry};

    use super::*;

    fn with_ring(f: impl FnOnce()) -> Vec<LogEvent> {
        let ring = RecentErrors::default();
        let subscriber = registry().with(ring.layer());
        tracing::subscriber::with_default(subscriber, f);
        ring.events()
    }

    #[test]
    fn keeps_warnings_and_errors_with_their_fields() {
        let got = with_ring(|| {
            info!("not kept");
            warn!(replica = "t0:7400", code = 14, "tracker unreachable");
            error!(error = %"disk full", "cache write failed");
        });
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].level, "WARN");
        assert_eq!(
            got[0].message,
            "tracker unreachable replica=t0:7400 code=14"
        );
        assert_eq!(got[0].target, module_path!());
        assert_eq!(got[1].level, "ERROR");
        assert_eq!(got[1].message, "cache write failed error=disk full");
        assert!(got[1].time >= got[0].time);
    }

    #[test]
    fn keeps_only_the_newest_ten() {
        let got = with_ring(|| {
            for i in 0..25 {
                warn!("failure {i}");
            }
        });
        let messages: Vec<&str> = got.iter().map(|e| e.message.as_str()).collect();
        let want: Vec<String> = (15..25).map(|i| format!("failure {i}")).collect();
        assert_eq!(messages, want);
    }

    #[test]
    fn long_messages_are_cut_at_a_character() {
        let long = "é".repeat(2000);
        let got = with_ring(|| warn!(body = %long, "{long}"));
        let m = &got[0].message;
        assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
        assert!(m.ends_with('…'), "{m}");
        assert!(m.starts_with("éé"));
    }
}
