//! The apps connected to this server, and what each has been sent: delivery from the
//! history, live and catching up, with no gap and no duplicate at the seam.
//!
//! Each app has a *cursor*, the offset of the last event it was sent. The tail delivers each
//! new event to the live apps whose scope allows it and whose cursor is behind it. An app
//! that connects with an offset is first caught up from the history, page by page, outside
//! the lock (the tail goes on meanwhile, skipping it); once a page comes back short and its
//! cursor is at or past what the tail has delivered, it turns live under the lock, so the
//! next event the tail delivers is the next one after its cursor. An app whose offset the
//! history cannot cover is sent `vendora:resync` first, then goes live.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError};

use crate::access::Grant;
use crate::history::{Entry, Offset};

/// One connected app (or live page).
pub(super) struct App {
    pub(super) socket: SocketRef,
    pub(super) grant: Grant,
    pub(super) ip: IpAddr,
    /// Delivered live by the tail (else being caught up).
    pub(super) live: bool,
    /// The last offset sent.
    pub(super) cursor: Offset,
    /// A live page: also gets what the server did with each webhook.
    pub(super) monitor: bool,
}

/// `vendora:ready`: the app is live from `offset` on. `recovered`: it was caught up from
/// where it left and missed nothing; `false` for a first connection and after a
/// `vendora:resync`, when the app loads its state from the backend.
#[derive(Debug, Serialize)]
pub(super) struct Ready<'a> {
    pub(super) epoch: &'a str,
    pub(super) offset: String,
    pub(super) recovered: bool,
}

/// `vendora:resync`: the events since the app's offset cannot be sent (another epoch, or no
/// longer kept): it must refetch its state from the backend, then carry on from `offset`.
#[derive(Debug, Serialize)]
pub(super) struct Resync<'a> {
    pub(super) reason: &'a str,
    pub(super) epoch: &'a str,
    pub(super) offset: String,
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) apps: HashMap<Sid, App>,
    /// Apps that hear every room.
    everyone: HashSet<Sid>,
    /// Apps by the rooms they hear.
    rooms: HashMap<String, HashSet<Sid>>,
    /// What the tail delivered last, and in which epoch (`None` before it started).
    pub(super) tail: Option<(Arc<str>, Offset)>,
}

/// Apps to drop after the lock is released: their buffer is full, they do not read.
pub(super) type Dropped = Vec<(SocketRef, String)>;

impl Registry {
    pub(super) fn add(&mut self, app: App) {
        let sid = app.socket.id;
        match &app.grant.scope {
            crate::Scope::All => {
                self.everyone.insert(sid);
            }
            crate::Scope::Rooms(rooms) => {
                for room in rooms {
                    self.rooms.entry(room.clone()).or_default().insert(sid);
                }
            }
        }
        self.apps.insert(sid, app);
    }

    pub(super) fn remove(&mut self, sid: Sid) -> Option<App> {
        let app = self.apps.remove(&sid)?;
        self.everyone.remove(&sid);
        if let crate::Scope::Rooms(rooms) = &app.grant.scope {
            for room in rooms {
                if let Some(members) = self.rooms.get_mut(room) {
                    members.remove(&sid);
                    if members.is_empty() {
                        self.rooms.remove(room);
                    }
                }
            }
        }
        Some(app)
    }

    /// Delivers `entry` to every live app it is for; `dropped` collects those that do not
    /// read.
    pub(super) fn deliver(&mut self, entry: &Entry, dropped: &mut Dropped) {
        let recipients: Vec<Sid> = match &entry.rooms {
            None => self.apps.keys().copied().collect(),
            Some(rooms) => {
                let mut to: Vec<Sid> = self.everyone.iter().copied().collect();
                for room in rooms.iter() {
                    if let Some(members) = self.rooms.get(room) {
                        to.extend(members.iter().copied());
                    }
                }
                to
            }
        };
        for sid in recipients {
            let Some(app) = self.apps.get_mut(&sid) else {
                continue;
            };
            // Behind this event, and live (an app catching up gets it from the history);
            // an app in two of its rooms is met twice and sent it once.
            if !app.live || app.cursor >= entry.offset {
                continue;
            }
            app.cursor = entry.offset;
            match send(&app.socket, entry) {
                Ok(()) => {}
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                    dropped.push((app.socket.clone(), app.grant.label()));
                }
                Err(_) => {}
            }
        }
        self.tail = Some((entry.epoch.clone(), entry.offset));
    }

    /// Every live app missed what the lost history held: each is told to refetch.
    pub(super) fn history_lost(&mut self, epoch: &Arc<str>, offset: Offset) {
        for app in self.apps.values().filter(|a| a.live) {
            let _ = app.socket.emit(
                "vendora:resync",
                &Resync {
                    reason: "the server's history was lost (Redis was emptied or restarted \
                             without its data)",
                    epoch,
                    offset: offset.to_string(),
                },
            );
        }
    }

    /// Turns an app live (see [`Start`]). A caught-up app turns live only if the tail has
    /// delivered nothing after its cursor: `false` tells the caller to read the history
    /// again.
    pub(super) fn go_live(&mut self, sid: Sid, start: Start<'_>) -> bool {
        let Some((epoch, tail)) = self.tail.clone() else {
            return false;
        };
        let Some(app) = self.apps.get_mut(&sid) else {
            // Disconnected meanwhile: nothing to do.
            return true;
        };
        let (cursor, recovered) = match start {
            Start::CaughtUp(cursor) if cursor < tail => return false,
            Start::CaughtUp(cursor) => (cursor, true),
            Start::Fresh | Start::Resync(_) => (tail, false),
        };
        app.cursor = cursor;
        app.live = true;
        let offset = cursor.to_string();
        if let Start::Resync(reason) = start {
            let _ = app.socket.emit(
                "vendora:resync",
                &Resync {
                    reason,
                    epoch: &epoch,
                    offset: offset.clone(),
                },
            );
        }
        let _ = app.socket.emit(
            "vendora:ready",
            &Ready {
                epoch: &epoch,
                offset,
                recovered,
            },
        );
        true
    }
}

/// How an app turns live.
#[derive(Debug, Clone, Copy)]
pub(super) enum Start<'a> {
    /// It came without an offset: live from now, `recovered: false` (it loads its state).
    Fresh,
    /// It was sent everything after its offset up to this one.
    CaughtUp(Offset),
    /// Its offset cannot be caught up from: told so, then live from now.
    Resync(&'a str),
}

/// Emits `entry` to one app: `emit(event, data, {"id", "offset", "epoch"})`.
pub(super) fn send(socket: &SocketRef, entry: &Entry) -> Result<(), SendError> {
    socket.emit(&*entry.event, &(&*entry.data, entry.meta()))
}
