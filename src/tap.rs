//! The tap (the client crate's `tap.rs`) for JavaScript: its events converted to JSON lines
//! (the schema the README documents) and handed over in batches through one threadsafe
//! function, as completions are. The relay itself never enters JavaScript.

use crate::convert::{self, NativeError};
use napi::bindgen_prelude::{Either, Function};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Result, Status};
use napi_derive::napi;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use vfio_user_client::proto::command_name;
use vfio_user_client::proto::describe::{errno_name, kind};
use vfio_user_client::{Tap, TapEvent, TapRecord};

type Sink = ThreadsafeFunction<(), (), Vec<String>, Status, false, true>;

/// Lines JavaScript has not taken yet, at most. Past it a relay thread waits for room, so a
/// peer flooding faster than JavaScript reads is slowed to JavaScript's pace (as a pipe
/// would) instead of growing memory; nothing is dropped.
#[napi]
pub const TAP_MAX_QUEUED_LINES: u32 = 4096;
const MAX_QUEUED_LINES: usize = TAP_MAX_QUEUED_LINES as usize;

/// Events waiting for JavaScript, and the function that takes them.
#[derive(Default)]
struct Queue {
    lines: Vec<String>,
    sink: Option<Arc<Sink>>,
    /// Set before the relay threads are joined (on JavaScript's thread, which then cannot
    /// take lines): from then on nobody waits for room.
    closing: bool,
    /// Relay threads waiting for room now.
    waiting: u32,
    /// JavaScript takes no lines (`hold(true)`, a consumer behind): they queue, and past
    /// `MAX_QUEUED_LINES` the relay waits, until `hold(false)` or the close.
    held: bool,
}

/// The queue and the room it signals when JavaScript takes its lines.
#[derive(Default)]
struct Events {
    queue: Mutex<Queue>,
    room: Condvar,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No relay thread waits for room any more.
    fn closing(&self) {
        self.lock().closing = true;
        self.room.notify_all();
    }
}

/// A running tap.
#[napi]
pub struct NativeTap {
    tap: Tap,
    events: Arc<Events>,
}

impl Drop for NativeTap {
    // Dropping `tap` joins its threads here, on JavaScript's thread: none may be waiting.
    fn drop(&mut self) {
        self.events.closing();
    }
}

/// Starts a tap listening on `listen`, relaying each client to `connect`; `on_events` gets
/// batches of JSON lines, one per event, while `observe(true)` (sessions opening and closing
/// are always reported). `head` data bytes of each message are shown.
#[napi(
    ts_args_type = "listen: string, connect: string, head: number, onEvents: (lines: string[]) => void"
)]
pub fn start_tap(
    listen: String,
    connect: String,
    head: u32,
    on_events: Function<'_, Vec<String>, ()>,
) -> Result<Either<NativeTap, NativeError>> {
    let events: Arc<Events> = Arc::default();
    let weak = Arc::downgrade(&events);
    let sink = on_events
        .build_threadsafe_function::<()>()
        .callee_handled::<false>()
        .weak::<true>()
        .build_callback(move |_ctx| {
            Ok(weak
                .upgrade()
                .map(|ev| {
                    let mut q = ev.lock();
                    if q.held && !q.closing {
                        return Vec::new();
                    }
                    let lines = std::mem::take(&mut q.lines);
                    drop(q);
                    ev.room.notify_all();
                    lines
                })
                .unwrap_or_default())
        })?;
    events.lock().sink = Some(Arc::new(sink));
    let ev = events.clone();
    let push = Arc::new(move |e: TapEvent| {
        let line = to_json(&e).to_string();
        let wake = {
            let mut g = ev.lock();
            if g.lines.len() >= MAX_QUEUED_LINES && !g.closing {
                g.waiting += 1;
                g = ev
                    .room
                    .wait_while(g, |q| q.lines.len() >= MAX_QUEUED_LINES && !q.closing)
                    .unwrap_or_else(|p| p.into_inner());
                g.waiting -= 1;
            }
            g.lines.push(line);
            if g.lines.len() == 1 && !g.held {
                g.sink.clone()
            } else {
                None
            }
        };
        if let Some(s) = wake {
            s.call((), ThreadsafeFunctionCallMode::NonBlocking);
        }
    });
    Ok(
        match Tap::listen(Path::new(&listen), Path::new(&connect), head as usize, push) {
            Ok(tap) => Either::A(NativeTap { tap, events }),
            Err(e) => Either::B(convert::from_error(&e)),
        },
    )
}

#[napi]
impl NativeTap {
    /// How long a session stays open once one of its sides has hung up, in ms (for sessions
    /// that start from now on).
    #[napi]
    pub fn set_linger(&self, ms: u32) {
        self.tap
            .set_linger(std::time::Duration::from_millis(u64::from(ms)));
    }

    /// Describe each message (true), or only relay (false, the default).
    #[napi]
    pub fn observe(&self, on: bool) {
        self.tap.observe(on);
    }

    /// Stops handing lines to JavaScript (true) until called with false: they wait here, and
    /// past `MAX_QUEUED_LINES` the relay threads wait for room, so a consumer that is behind
    /// slows the peers instead of growing memory; nothing is dropped. The close delivers
    /// everything whatever the hold.
    #[napi]
    pub fn hold(&self, on: bool) {
        let sink = {
            let mut q = self.events.lock();
            q.held = on;
            if on || q.lines.is_empty() {
                return;
            }
            q.sink.clone()
        };
        if let Some(s) = sink {
            s.call((), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }

    /// Lines waiting for JavaScript to take them (at most `MAX_QUEUED_LINES`).
    #[napi(getter)]
    pub fn queued(&self) -> u32 {
        self.events.lock().lines.len() as u32
    }

    /// Relay threads waiting for JavaScript to take lines (a peer sending faster than
    /// JavaScript reads).
    #[napi(getter)]
    pub fn stalled(&self) -> u32 {
        self.events.lock().waiting
    }

    /// Sessions open now.
    #[napi(getter)]
    pub fn sessions(&self) -> u32 {
        self.tap.sessions() as u32
    }

    /// Stops listening and ends every session; the events already queued are still
    /// delivered, ending with `{"type":"end"}`, then the callback is released. Idempotent.
    #[napi]
    pub fn close(&self) {
        // Every relay thread has been joined when this returns: nothing is reported after the
        // `end` line, which tells JavaScript it has everything.
        self.events.closing();
        self.tap.close();
        let sink = {
            let mut q = self.events.lock();
            let Some(sink) = q.sink.take() else {
                return;
            };
            q.lines.push(json!({ "type": "end" }).to_string());
            sink
        };
        sink.call((), ThreadsafeFunctionCallMode::NonBlocking);
    }
}

/// One event as the README's NDJSON schema has it.
fn to_json(e: &TapEvent) -> Value {
    match e {
        TapEvent::Opened { session } => json!({ "type": "open", "session": session }),
        TapEvent::Closed { session, reason } => {
            json!({ "type": "close", "session": session, "reason": reason })
        }
        TapEvent::Refused { reason, full } => {
            json!({ "type": "refused", "reason": reason, "full": full })
        }
        TapEvent::Record(r) => record(r),
    }
}

fn record(r: &TapRecord) -> Value {
    let h = &r.header;
    let mut v = json!({
        "type": "message",
        "session": r.session,
        "time": r.at.as_secs_f64() * 1000.0,
        "from": r.sender.name(),
        "id": h.id,
        "command": command_name(h.command),
        "commandNumber": h.command,
        "kind": kind(h),
        "size": h.payload_len(),
        "fds": r.fds,
        "fields": Value::Object(r.description.fields.clone()),
    });
    let o = v.as_object_mut().expect("built as an object above");
    if h.no_reply() {
        o.insert("noReply".into(), json!(true));
    }
    if h.is_error() {
        o.insert("errno".into(), json!(h.error));
        o.insert("errnoName".into(), json!(errno_name(h.error)));
    }
    if let Some(l) = r.latency {
        o.insert("latencyUs".into(), json!(l.as_secs_f64() * 1e6));
    }
    if r.description.data_at.is_some() {
        let head: String = r.data_head.iter().map(|b| format!("{b:02x}")).collect();
        o.insert(
            "data".into(),
            json!({ "length": r.description.data_len, "head": head }),
        );
    }
    if let Some(why) = &r.description.undecodable {
        o.insert("undecodable".into(), json!(why));
    }
    v
}
