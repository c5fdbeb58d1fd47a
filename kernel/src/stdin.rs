//! The kernel's stdin channel: `input()` on an engine asks the frontend.
//!
//! The path of one `input("name? ")` in a `%%px --targets 0` cell:
//!
//! 1. the session sends the execute_request with `allow_stdin: true` (only
//!    for a blocking cell with one target whose frontend request allowed
//!    stdin; otherwise `allow_stdin: false` and `stdin_refused`, the reason
//!    the engine puts in its StdinNotImplementedError);
//! 2. the engine publishes an `input_request` {prompt, password} on its
//!    iopub, parented to that execute_request — engines have no stdin
//!    channel through the hub, and the kernel already listens on iopub for
//!    that parent;
//! 3. the session asks the frontend through [`FrontendStdin::ask`]: this
//!    module's task sends an `input_request` on the kernel's stdin ROUTER,
//!    routed by the identities of the frontend's execute_request and
//!    parented to it (as ipykernel does);
//! 4. the frontend's `input_reply` {value} comes back on stdin; the session
//!    sends `input_reply` {value} on the hub's control channel to that
//!    engine, parented to the engine's input_request (the engine drops
//!    replies to anything else), and `input()` returns the value.
//!
//! Only one question is open at a time (a cell with one target runs one
//! `input()` at a time). A question whose asker is gone (the cell ended or
//! was interrupted) is forgotten; a reply nobody waits for is dropped.
//! Nothing here waits without a bound: the session drops its question when
//! the cell ends, and an interrupt ends the engine's wait.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::Utc;
use parallax_wire::{Authenticator, Limits, Session, format_date};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use zeromq::{RouterSocket, SocketRecv, SocketSend, ZmqMessage};

/// One question for the frontend.
struct Ask {
    idents: Vec<Bytes>,
    parent: Value,
    prompt: String,
    password: bool,
    /// Dropped by the asker when it stops waiting.
    answer: oneshot::Sender<String>,
}

/// The stdin channel as one execute_request sees it.
#[derive(Clone)]
pub struct FrontendStdin {
    tx: mpsc::UnboundedSender<Ask>,
    /// The routing identities of the frontend's execute_request (its stdin
    /// DEALER has the same identity as its shell DEALER).
    idents: Vec<Bytes>,
    /// The frontend's execute_request header.
    parent: Value,
    /// The request's `allow_stdin`.
    pub allowed: bool,
}

impl FrontendStdin {
    /// Ask the frontend; `None` if the stdin task is gone. Dropping the
    /// future withdraws the question.
    pub async fn ask(&self, prompt: &str, password: bool) -> Option<String> {
        let (answer, rx) = oneshot::channel();
        self.tx
            .send(Ask {
                idents: self.idents.clone(),
                parent: self.parent.clone(),
                prompt: prompt.to_owned(),
                password,
                answer,
            })
            .ok()?;
        rx.await.ok()
    }
}

/// A handle to the stdin task, from which each execute_request gets its
/// [`FrontendStdin`].
#[derive(Clone)]
pub struct StdinChannel {
    tx: mpsc::UnboundedSender<Ask>,
}

impl StdinChannel {
    /// Start the task that owns the stdin ROUTER (it ends when every handle
    /// is dropped).
    pub fn spawn(
        sock: RouterSocket,
        auth: Authenticator,
        session: Arc<Mutex<Session>>,
    ) -> StdinChannel {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(sock, auth, session, rx));
        StdinChannel { tx }
    }

    pub fn for_request(&self, idents: Vec<Bytes>, parent: Value, allowed: bool) -> FrontendStdin {
        FrontendStdin {
            tx: self.tx.clone(),
            idents,
            parent,
            allowed,
        }
    }
}

async fn run(
    mut sock: RouterSocket,
    mut auth: Authenticator,
    session: Arc<Mutex<Session>>,
    mut rx: mpsc::UnboundedReceiver<Ask>,
) {
    let limits = Limits::default();
    // (input_request msg_id, where the answer goes)
    let mut open: Option<(String, oneshot::Sender<String>)> = None;
    loop {
        tokio::select! {
            ask = rx.recv() => {
                let Some(ask) = ask else { return };
                let (msg_id, frames) = {
                    let mut s = session.lock().expect("session");
                    let h = s.header("input_request", &format_date(Utc::now()));
                    let frames = s.serialize(
                        ask.idents,
                        &h,
                        &ask.parent,
                        &json!({}),
                        &json!({"prompt": ask.prompt, "password": ask.password}),
                        vec![],
                    );
                    (h.msg_id, frames)
                };
                let Ok(m) = ZmqMessage::try_from(frames) else { continue };
                if let Err(e) = sock.send(m).await {
                    warn!(error = %e, "input_request not sent to the frontend");
                    continue; // the asker's answer channel drops: it stops waiting
                }
                open = Some((msg_id, ask.answer));
            }
            m = sock.recv() => {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        debug!(error = %e, "stdin socket error");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Some(msg) = crate::frontend::verify(m.into_vec(), &mut auth, &limits, "stdin") else {
                    continue;
                };
                if msg.msg_type() != "input_reply" {
                    debug!(msg_type = msg.msg_type(), "unexpected message on stdin dropped");
                    continue;
                }
                // jupyter_client's `KernelClient.input` sends no parent;
                // one that names another request is stale.
                let stale = matches!((&open, msg.parent_msg_id()), (Some((id, _)), Some(p)) if p != id);
                match open.take() {
                    Some((id, answer)) if !stale => {
                        let value = msg.content.get("value").and_then(Value::as_str).unwrap_or("");
                        if answer.send(value.to_owned()).is_err() {
                            debug!(msg_id = %id, "input_reply after the cell stopped waiting");
                        }
                    }
                    o => {
                        open = o;
                        debug!("input_reply for no open input_request dropped");
                    }
                }
            }
        }
    }
}
