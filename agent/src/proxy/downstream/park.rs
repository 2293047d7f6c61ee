//! The lot of parked connections: plaintext HTTP/1.1 client connections idle between requests
//! for `proxy.idle_park_after`, held outside tokio.
//!
//! An idle keep-alive connection otherwise holds its task (its future and tokio's header), its
//! registration in tokio's reactor, its context and its watches' timer; parked, it holds an entry
//! here (the socket in an epoll set of the lot's own, its listener, its places under the caps,
//! its drain watch, its deadlines) and nothing else. The client's next bytes, or its close,
//! resume it: a new task serves it as before, with its context made again, under the same
//! deadlines. At that deadline (`proxy.header_read_timeout` after its last response, or
//! `proxy.idle_timeout`, whichever is first) the lot closes it, as the connection's own watch
//! would have. The drain resumes every parked connection, which then lingers and closes as any
//! idle connection does (`watch.rs`).
//!
//! One lot per proxy (`Shared::lot`), made at the first park: one task that waits on the lot's
//! epoll set (itself registered in tokio's reactor), on its earliest deadline and on the drain.
//! Parking and resuming each cost two `epoll_ctl` calls (out of tokio's set and into the lot's,
//! and back), resuming also a `getpeername` and a task: the reason connections park only after a
//! pause, not between the requests of a busy connection. The lot's task looks at readiness before
//! deadlines (a client that sent is served, not closed with its bytes unread), and gives memory
//! back (`malloc_trim`) on the blocking pool, not on a worker of the runtime.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::h1::Parking;
use crate::proxy::{ConnActivity, ConnCtx, DrainWatch, Held, ListenerCtx, Shared};

/// Events taken from the lot's set per wake.
const EVENTS: usize = 256;

/// Stale deadlines (of connections resumed since) kept before the heap is swept.
const STALE_SWEEP: usize = 64;

/// Connections parked since the allocator last gave free memory back, for it to do so again
/// ([`Lot::trim`]): a burst of connections that went idle leaves their tasks' memory free.
const TRIM_AFTER_PARKS: usize = 1024;

/// How long parking must have paused before that (one trim after a burst, not one per park).
const TRIM_QUIET: Duration = Duration::from_millis(500);

/// The parked connections of one proxy.
pub struct Lot {
    registry: mio::Registry,
    /// For the contexts of resumed connections (not kept alive by the lot).
    shared: Weak<Shared>,
    state: Mutex<State>,
    /// Wakes the lot's task when a connection parks with a deadline before the one it waits
    /// for, or when a trim is due.
    sooner: Notify,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Deadlines by slot and generation; entries of connections resumed since are stale
    /// (their generation moved on), skipped when reached and swept when many.
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// The generation of the next park, over the whole lot (never reused with a slot: a slot
    /// dropped by a trim and made again cannot match a deadline left from before).
    next_generation: u32,
    /// Parks since the last trim, and when the last one was.
    parks_untrimmed: usize,
    last_park: Option<Instant>,
    /// The agent drains: nothing parks any more.
    closed: bool,
}

impl State {
    /// Connections parked now: every slot is free or holds one.
    fn parked(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[derive(Default)]
struct Slot {
    /// The generation of the connection parked here (or last parked here).
    generation: u32,
    conn: Option<Parked>,
}

/// A parked connection: all it keeps (its task, context, activity, buffers and its registration
/// in tokio's reactor are freed; the context is made again when it resumes).
struct Parked {
    stream: MioStream,
    listener: Arc<ListenerCtx>,
    /// Its places under the connection caps and its count in the open connections.
    held: Held,
    /// The agent's drain waits for it, as for any open connection.
    drain: DrainWatch,
    /// When the head the connection waits for is due (it resumes under the same deadline).
    head_due: Instant,
    /// Since when it has had no request (its `proxy.idle_timeout` counts from then, resumed too).
    idle_since: Instant,
}

/// The lot's epoll set, as tokio polls it.
struct PollFd(mio::Poll);

impl AsRawFd for PollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

// A token holds a slot and its generation in 64 bits.
const _: () = assert!(usize::BITS >= 64, "the lot of parked connections needs 64-bit tokens");

fn token(index: u32, generation: u32) -> Token {
    Token((usize::try_from(generation).unwrap_or(0) << 32) | usize::try_from(index).unwrap_or(0))
}

fn untoken(t: Token) -> (u32, u32) {
    let t = t.0 as u64;
    ((t & u64::from(u32::MAX)) as u32, (t >> 32) as u32)
}

/// Parks the connection of `ctx`, idle with nothing buffered (`p`: its stream and deadlines).
/// Served on at once where it cannot park (the agent drains, no lot, its context still held
/// elsewhere).
pub fn park(p: Parking, ctx: Arc<ConnCtx>) {
    let lot = ctx
        .shared
        .lot
        .get_or_init(|| {
            Lot::start(&ctx.shared, ctx.activity.drain.clone())
                .map_err(|e| tracing::warn!(error = %e, "cannot make the lot of parked connections: idle connections stay on their tasks"))
                .ok()
        })
        .clone();
    match lot {
        Some(lot) => lot.park(p, ctx),
        None => serve_on(p.stream, ctx, p.head_due),
    }
}

/// Serves a connection that did not park on a new task, its next head due at `head_due` (one
/// that was served: it came to park after a request).
fn serve_on(stream: tokio::net::TcpStream, ctx: Arc<ConnCtx>, head_due: Instant) {
    ctx.activity.mark_parked_once();
    tokio::spawn(crate::proxy::http::resume(stream, ctx.head_due_at(head_due)));
}

impl Lot {
    /// A lot with its task, which runs until the agent drains.
    fn start(shared: &Arc<Shared>, drain: DrainWatch) -> std::io::Result<Arc<Self>> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the fd is the epoll set `PollFd` owns: open, and the same, until the `AsyncFd`
        // (its only owner) drops it; nothing replaces the `mio::Poll` inside.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(PollFd(poll), tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let lot = Arc::new(Self {
            registry,
            shared: Arc::downgrade(shared),
            state: Mutex::new(State::default()),
            sooner: Notify::new(),
            gauge: shared.metrics.connections_parked.clone(),
        });
        tokio::spawn(run(lot.clone(), fd, drain));
        Ok(lot)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock's state is as it was.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn park(&self, parking: Parking, ctx: Arc<ConnCtx>) {
        let Parking {
            stream,
            head_due,
            close_at,
            idle_since,
        } = parking;
        let (held, drain, listener) = match ctx.into_held() {
            Ok(parts) => parts,
            Err(ctx) => {
                serve_on(stream, ctx, head_due);
                return;
            }
        };
        // Out of tokio's reactor (a std stream, still non-blocking) and into the lot's set. Bytes
        // that arrive in between are not lost: the set reports a socket readable when added.
        let stream = match stream.into_std() {
            Ok(s) => MioStream::from_std(s),
            Err(e) => {
                tracing::debug!(error = %e, "cannot park a connection: closing it");
                return;
            }
        };
        let mut p = Parked {
            stream,
            listener,
            held,
            drain,
            head_due,
            idle_since,
        };
        let mut state = self.state();
        if state.closed {
            drop(state);
            self.serve_again(p);
            return;
        }
        let index = match state.free.pop() {
            Some(i) => i,
            None => match u32::try_from(state.slots.len()) {
                Ok(i) => {
                    state.slots.push(Slot::default());
                    i
                }
                Err(_) => {
                    drop(state);
                    self.serve_again(p);
                    return;
                }
            },
        };
        let generation = state.next_generation;
        state.next_generation = generation.wrapping_add(1);
        state.slots[index as usize].generation = generation;
        if let Err(e) = self
            .registry
            .register(&mut p.stream, token(index, generation), Interest::READABLE)
        {
            state.free.push(index);
            drop(state);
            tracing::debug!(error = %e, "cannot park a connection: served on");
            self.serve_again(p);
            return;
        }
        state.slots[index as usize].conn = Some(p);
        let sooner = state.deadlines.peek().is_none_or(|Reverse((at, _, _))| close_at < *at);
        state.deadlines.push(Reverse((close_at, index, generation)));
        state.parks_untrimmed += 1;
        state.last_park = Some(Instant::now());
        let trim_due = state.parks_untrimmed == TRIM_AFTER_PARKS;
        drop(state);
        self.gauge.inc();
        if sooner || trim_due {
            self.sooner.notify_one();
        }
    }

    /// Takes the connection parked in `index` at `generation`, if it still is.
    fn take(&self, state: &mut State, index: u32, generation: u32) -> Option<Parked> {
        let slot = state.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let parked = slot.conn.take()?;
        state.free.push(index);
        self.gauge.dec();
        Some(parked)
    }

    /// Out of the lot's set and onto a task of its own, with its context made again.
    fn serve_again(&self, p: Parked) {
        let Parked {
            mut stream,
            listener,
            held,
            drain,
            head_due,
            idle_since,
        } = p;
        let _ = self.registry.deregister(&mut stream);
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let stream = match tokio::net::TcpStream::from_std(std::net::TcpStream::from(stream)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot resume a parked connection: closing it");
                return;
            }
        };
        let Ok(client) = stream.peer_addr() else {
            // The client is gone (reset): nothing to serve.
            return;
        };
        let activity = ConnActivity::resumed(shared.in_flight.clone(), held, drain, idle_since);
        let ctx = ConnCtx::new(shared, listener, client, None, activity).head_due_at(head_due);
        tokio::spawn(crate::proxy::http::resume(stream, ctx));
    }

    /// Resumes the connections the set reported (bytes, or the client's close).
    fn woken(&self, events: &Events) {
        for event in events {
            let (index, generation) = untoken(event.token());
            let parked = self.take(&mut self.state(), index, generation);
            if let Some(p) = parked {
                self.serve_again(p);
            }
        }
    }

    /// Closes the connections whose deadline passed by `now`.
    fn expire(&self, now: Instant) {
        let mut closing = Vec::new();
        {
            let mut state = self.state();
            while let Some(&Reverse((at, index, generation))) = state.deadlines.peek() {
                if at > now {
                    break;
                }
                state.deadlines.pop();
                if let Some(p) = self.take(&mut state, index, generation) {
                    closing.push(p);
                }
            }
        }
        for mut p in closing {
            tracing::debug!("parked downstream connection idle: closing");
            let _ = self.registry.deregister(&mut p.stream);
        }
    }

    /// When the lot's task looks again: the earliest deadline, or a trim after a burst of parks.
    /// The heap is swept of stale entries when they are many.
    fn next_wake(&self) -> Option<Instant> {
        let mut state = self.state();
        let parked = state.parked();
        let stale = state.deadlines.len().saturating_sub(parked);
        if stale > STALE_SWEEP && stale > parked {
            let State { slots, deadlines, .. } = &mut *state;
            deadlines.retain(|Reverse((_, i, g))| {
                slots
                    .get(*i as usize)
                    .is_some_and(|s| s.generation == *g && s.conn.is_some())
            });
            if deadlines.capacity() > 4 * deadlines.len().max(16) {
                deadlines.shrink_to_fit();
            }
        }
        let deadline = state.deadlines.peek().map(|Reverse((at, _, _))| *at);
        let trim = (state.parks_untrimmed >= TRIM_AFTER_PARKS)
            .then_some(state.last_park)
            .flatten()
            .map(|at| at + TRIM_QUIET);
        deadline.into_iter().chain(trim).min()
    }

    /// After a burst of parks, once parking paused: the allocator gives the free memory of the
    /// connections' tasks and contexts back to the system.
    fn trim(&self, now: Instant) {
        let mut state = self.state();
        let quiet = state.last_park.is_some_and(|at| now >= at + TRIM_QUIET);
        if state.parks_untrimmed < TRIM_AFTER_PARKS || !quiet {
            return;
        }
        state.parks_untrimmed = 0;
        let slots = state.slots.len();
        if state.free.len() > slots / 2 && slots > 1024 {
            // Most slots free after a flood: the lists shrink with it.
            while state.slots.last().is_some_and(|s| s.conn.is_none()) {
                state.slots.pop();
            }
            let len = u32::try_from(state.slots.len()).unwrap_or(u32::MAX);
            state.free.retain(|i| *i < len);
            state.deadlines.retain(|Reverse((_, i, _))| *i < len);
            state.slots.shrink_to_fit();
            state.free.shrink_to_fit();
        }
        drop(state);
        // It walks and locks the allocator's arenas: not on a worker of the runtime.
        tokio::task::spawn_blocking(give_back_free_memory);
    }

    /// The agent drains: every parked connection is served again (to linger and close as an
    /// idle connection does), and nothing parks from now on.
    fn close(&self) {
        let resumed: Vec<Parked> = {
            let mut state = self.state();
            state.closed = true;
            let slots: Vec<(u32, u32)> = (0..).zip(&state.slots).map(|(i, s)| (i, s.generation)).collect();
            let resumed = slots
                .into_iter()
                .filter_map(|(i, g)| self.take(&mut state, i, g))
                .collect();
            state.deadlines.clear();
            resumed
        };
        for p in resumed {
            self.serve_again(p);
        }
    }
}

/// glibc keeps freed memory for reuse; after a burst of connections went idle this returns its
/// free pages to the system (`malloc_trim`). Elsewhere a no-op.
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes the allocator's own locks and only releases free pages.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// The lot's task: resumes the connections that became readable, closes those past their
/// deadline, and at the drain serves them all again and ends.
async fn run(lot: Arc<Lot>, mut fd: AsyncFd<PollFd>, mut drain: DrainWatch) {
    let mut events = Events::with_capacity(EVENTS);
    let mut next: Option<Instant> = None;
    loop {
        let timer = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Readiness first: a connection whose client sent is resumed, not closed at its
            // deadline with the bytes unread.
            biased;
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        // Not expected from an epoll set; the parked connections are served again.
                        tracing::error!(error = %e, "the lot of parked connections failed: serving them again");
                        break;
                    }
                };
                match guard.get_inner_mut().0.poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => {
                        if events.iter().count() < EVENTS {
                            guard.clear_ready();
                        }
                        lot.woken(&events);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(error = %e, "the lot of parked connections failed: serving them again");
                        break;
                    }
                }
            }
            () = timer => {
                // What became readable since the set was last looked at resumes before the
                // deadlines are looked at (the task may run late).
                loop {
                    match fd.get_mut().0.poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) => lot.woken(&events),
                        Err(e) => tracing::debug!(error = %e, "the lot's set could not be looked at before its deadlines"),
                    }
                    if events.iter().count() < EVENTS {
                        break;
                    }
                }
                let now = Instant::now();
                lot.expire(now);
                lot.trim(now);
            }
            () = lot.sooner.notified() => {}
            () = drain.signaled() => break,
        }
        next = lot.next_wake();
    }
    lot.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lot() -> Lot {
        Lot {
            registry: mio::Poll::new().unwrap().registry().try_clone().unwrap(),
            shared: Weak::new(),
            state: Mutex::new(State::default()),
            sooner: Notify::new(),
            gauge: Default::default(),
        }
    }

    /// A connection that parks and resumes again and again leaves a stale deadline each time:
    /// they are swept once they outnumber the parked connections (and `STALE_SWEEP`), so the
    /// heap stays in proportion to what is parked, and the earliest live deadline is kept.
    #[test]
    fn stale_deadlines_are_swept_and_the_live_one_kept() {
        let lot = lot();
        let t0 = Instant::now();
        {
            let mut state = lot.state();
            // One slot parked at generation 1000 (its deadline the latest), after 1000 earlier
            // parks of the same slot that resumed.
            state.slots.push(Slot {
                generation: 1000,
                conn: None,
            });
            for g in 0..=1000u32 {
                state
                    .deadlines
                    .push(Reverse((t0 + Duration::from_millis(u64::from(g)), 0, g)));
            }
        }
        // Stand in for a parked connection in slot 0 (the sweep looks at `conn`).
        let (client, server) = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (c, l.accept().unwrap().0)
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_drain, drain) = crate::proxy::Drain::new();
            let permits = (
                Arc::new(tokio::sync::Semaphore::new(1)).acquire_owned().await.unwrap(),
                Arc::new(tokio::sync::Semaphore::new(1)).acquire_owned().await.unwrap(),
            );
            let activity = ConnActivity::new(
                crate::proxy::InFlightCap::new(1),
                permits,
                Default::default(),
                drain.clone(),
            );
            let (held, drain) = activity.into_held().ok().unwrap();
            let listener = Arc::new(ListenerCtx {
                name: "t".into(),
                kind: crate::proxy::ListenerKind::Inbound,
                direction: crate::telemetry::metrics::Direction::Inbound,
                http: Arc::new(hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )),
            });
            let mut state = lot.state();
            state.slots[0].conn = Some(Parked {
                stream: MioStream::from_std(server),
                listener,
                held,
                drain,
                head_due: t0,
                idle_since: t0,
            });
        });
        assert_eq!(lot.next_wake(), Some(t0 + Duration::from_millis(1000)));
        assert_eq!(lot.state().deadlines.len(), 1, "the stale ones are swept");
        drop(client);
    }

    /// After a flood the trim drops the free slots at the end, and with them every deadline
    /// that names one: a slot made again later (with a new generation from the lot's counter)
    /// is never matched by a deadline left from before.
    #[tokio::test]
    async fn a_trim_drops_the_deadlines_of_the_slots_it_drops() {
        let lot = lot();
        let t0 = Instant::now();
        {
            let mut state = lot.state();
            for i in 0..2000u32 {
                state.slots.push(Slot {
                    generation: i,
                    conn: None,
                });
                state.free.push(i);
                state.deadlines.push(Reverse((t0 + Duration::from_secs(60), i, i)));
            }
            state.next_generation = 2000;
            state.parks_untrimmed = TRIM_AFTER_PARKS;
            state.last_park = Some(t0);
        }
        lot.trim(t0 + TRIM_QUIET);
        let state = lot.state();
        assert!(state.slots.is_empty(), "{} slots kept", state.slots.len());
        assert!(state.free.is_empty());
        assert!(state.deadlines.is_empty(), "{} deadlines kept", state.deadlines.len());
        assert_eq!(state.parks_untrimmed, 0);
        assert_eq!(state.next_generation, 2000, "generations are not reused");
    }

    #[test]
    fn tokens_carry_the_slot_and_its_generation() {
        for (i, g) in [(0, 0), (1, 0), (0, 1), (u32::MAX, u32::MAX), (7, 1 << 31)] {
            assert_eq!(untoken(token(i, g)), (i, g));
        }
    }
}
