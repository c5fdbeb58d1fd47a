//! The SQLite task database (`parallax hub --sqlitedb`): the records of
//! [`crate::records`] kept in a file, so they outlive the hub.
//!
//! The core sees a [`TaskDb`] like any other. Behind it:
//!
//! * a **writer thread** owns the one SQLite connection and a **cache** of
//!   the `cache_records` most recently added records. Every operation
//!   reaches it over one bounded channel, in order; the core's thread only
//!   moves the record or the changed fields into the channel (no copy, no
//!   disk, no SQL). The writer applies each write to its cached record and
//!   marks the columns it changed; when the batch commits (after
//!   `batch_records` operations or `batch_window`), each changed record
//!   becomes one statement however many writes it had: an `INSERT` of the
//!   whole row for a new record, an `UPDATE` of the changed columns
//!   otherwise, prepared once per column set, the row serialised into
//!   reused buffers. A write to a record no longer cached updates its row
//!   in place. A record leaving the cache is written first.
//! * **reads** travel the same channel and are answered in order, on the
//!   same connection (after writing what the cache holds back), so a query
//!   sees every write queued before it without waiting for a commit;
//!   `get_record` of a cached record is answered from memory.
//! * the writer is woken once per batch, not per write: a write wakes it
//!   only when it is idle (or its queue half full); reads wake it at once.
//! * what the core's thread allocated (records, field maps, msg_ids) goes
//!   back to that thread to be freed, after each commit: glibc's allocator
//!   serves a thread from what it freed itself, and frees on the writer's
//!   thread would contend for the arena's lock with the core's allocations.
//!
//! Queries run the in-memory matcher (`records::Query`) on the records, so
//! their semantics are DictDB's exactly; SQL only narrows the candidates
//! (`msg_id` lookups, `IS NULL`, string equality) and decodes the columns
//! the query looks at before it decodes a whole record.
//!
//! File format (Parallax's own; ipcontroller's pickles its buffers): one
//! table, `msg_id` as text (primary key), each other record key a column of
//! JSON text (SQL `NULL` for `null`), `buffers`/`result_buffers` as BLOBs of
//! length-prefixed frames, `extra` a JSON object of any non-standard keys.
//! Insertion order is the rowid. The database is in WAL mode with
//! `auto_vacuum = INCREMENTAL`: after a purge the writer returns the free
//! pages to the file system a slice at a time, between batches.
//! `PRAGMA user_version` records the format, so later tables (engine
//! registrations for `--restore`) can be added beside this one.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use crate::records::{
    BUFFER_KEYS, DbError, FoundRecord, Prefilter, Query, RECORD_KEYS, TaskDb, TaskRecord,
    history_order, merge_request, project, record_size,
};

/// The file format version in `PRAGMA user_version`.
const FORMAT_VERSION: i64 = 1;

/// Free pages returned to the file system per vacuum step (4 MiB with the
/// default 4 KiB pages): small enough not to hold up a batch for long.
const VACUUM_PAGES: u32 = 1024;

/// How long the writer waits for work before another vacuum step.
const VACUUM_IDLE: Duration = Duration::from_millis(50);

/// Longest an idle writer sleeps before it looks at its queue again (it is
/// woken sooner; this only bounds the cost of a missed wake-up).
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// Operations queued for the writer before `add_request` and friends block
/// (backpressure, like the core's bounded input channel).
const QUEUE_CAPACITY: usize = 16 * 1024;

/// Where and how the records are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteConfig {
    pub path: PathBuf,
    pub table: String,
    /// Records kept in memory as well (the most recently added).
    pub cache_records: usize,
    /// Most operations per transaction.
    pub batch_records: usize,
    /// Longest a write waits for its transaction's commit.
    pub batch_window: Duration,
}

impl SqliteConfig {
    pub fn new(path: PathBuf) -> Self {
        SqliteConfig {
            path,
            table: "tasks".into(),
            cache_records: 1024,
            batch_records: 2048,
            batch_window: Duration::from_millis(5),
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum OpenError {
    #[error("task database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "task database {path}: table {table:?} is not a Parallax task table (it lacks {missing:?}); choose another with --table"
    )]
    NotATaskTable {
        path: PathBuf,
        table: String,
        missing: Vec<String>,
    },
    #[error("task database {path}: starting its writer thread: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The record keys stored in JSON columns: every key but `msg_id` and the buffers.
fn json_keys() -> impl Iterator<Item = &'static str> {
    JSON_KEYS.into_iter()
}

fn is_column(key: &str) -> bool {
    RECORD_KEYS.contains(&key)
}

/// `"name"` with inner quotes doubled: any table name is safe in SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Which of the store's writes are committed. The driver holds a client's
/// result back until the write that recorded it is committed, so a result a
/// client has received is in the database even if the hub is killed the
/// next instant (group commit: the batch window adds latency, not work).
#[derive(Clone)]
pub struct Durability(Arc<Shared>);

impl Durability {
    /// Sequence number of the last operation queued so far.
    pub fn queued(&self) -> u64 {
        self.0.sent.load(Ordering::Acquire)
    }

    /// Sequence number of the last operation committed.
    pub fn durable(&self) -> u64 {
        self.0.durable.load(Ordering::Acquire)
    }

    /// Resolves after the next commit (or at once if one happened since
    /// the last call).
    pub async fn committed(&self) {
        self.0.committed.notified().await
    }
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability")
            .field("queued", &self.queued())
            .field("durable", &self.durable())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// The store the core holds
// ---------------------------------------------------------------------------

/// The SQLite task database (see the module docs).
pub struct SqliteDb {
    /// Held by this store only; dropping it ends the writer, which commits
    /// what is queued and closes the file.
    tx: Option<SyncSender<(u64, Op)>>,
    writer: Option<JoinHandle<()>>,
    /// The writer's thread, unparked when it must look at its queue now
    /// (see [`SqliteDb::send`]).
    waker: Thread,
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What the writer and the store share.
#[derive(Debug, Default)]
struct Shared {
    /// Sequence number of the last operation sent.
    sent: AtomicU64,
    /// Sequence number of the last operation the writer applied.
    applied: AtomicU64,
    /// Sequence number of the last operation committed (on disk: it
    /// survives the hub's death).
    durable: AtomicU64,
    /// Woken after each commit (see [`Durability`]).
    committed: tokio::sync::Notify,
    commits: AtomicU64,
    /// The writer waits for the first operation of a batch: a write must
    /// wake it. Within a batch it sleeps until the batch window closes and
    /// writes do not wake it (one wake-up per batch, not per write).
    idle: AtomicBool,
    /// Memory the core's thread allocated (records, field maps, the
    /// msg_ids of the operations) that the writer is done with, handed back
    /// for that thread to free. glibc serves a thread's allocations from
    /// what the same thread freed; frees on the writer's thread went
    /// through the arena's lock instead, contended with the core's
    /// allocations, and left the core's per-thread cache empty.
    trash: Mutex<Vec<Trash>>,
    has_trash: AtomicBool,
    /// An emptied trash vector, back to the writer to fill again: its
    /// buffer (tens of KiB) is reused rather than freed and grown every
    /// batch (a free that large makes glibc consolidate its fast bins).
    spare: Mutex<Vec<Trash>>,
}

/// Something allocated on the core's thread, kept only to be dropped there.
#[allow(dead_code, reason = "held only to be dropped on the core's thread")]
#[derive(Debug)]
enum Trash {
    Record(String, TaskRecord),
    Fields(Map<String, Value>),
    Value(Value),
    Text(String),
    Buffers(Vec<Bytes>),
}

impl std::fmt::Debug for SqliteDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDb")
            .field("path", &self.path)
            .field("queued", &self.shared.sent.load(Ordering::Relaxed))
            .finish()
    }
}

impl SqliteDb {
    /// Opens (creating if needed) the database and starts its writer.
    pub fn open(cfg: &SqliteConfig) -> Result<SqliteDb, OpenError> {
        let mut conn = Writer::open(cfg)?;
        let shared = Arc::new(Shared::default());
        conn.shared = Arc::clone(&shared);
        let existing: i64 = conn
            .conn
            .query_row(&format!("SELECT count(*) FROM {}", conn.table), [], |r| {
                r.get(0)
            })
            .map_err(|source| OpenError::Sqlite {
                path: cfg.path.clone(),
                source,
            })?;
        info!(path = %cfg.path.display(), table = %cfg.table, records = existing, "task database opened");
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer = std::thread::Builder::new()
            .name("parallax-sqlite".into())
            .spawn(move || conn.run(rx))
            .map_err(|source| OpenError::Thread {
                path: cfg.path.clone(),
                source,
            })?;
        Ok(SqliteDb {
            tx: Some(tx),
            waker: writer.thread().clone(),
            writer: Some(writer),
            path: cfg.path.clone(),
            shared,
        })
    }

    /// Queues `op` for the writer; returns its sequence number. The writer
    /// is woken for a read (answered at once), when it is idle, and when
    /// the queue is half full; other writes wait for the end of its batch
    /// window.
    fn send(&self, op: Op) -> Result<u64, DbError> {
        self.free_trash();
        let prompt = op.is_read();
        let tx = self.tx.as_ref().expect("sender held until drop");
        let seq = self.shared.sent.fetch_add(1, Ordering::AcqRel) + 1;
        tx.send((seq, op)).map_err(|_| {
            DbError::Storage(format!(
                "task database {}: writer has stopped",
                self.path.display()
            ))
        })?;
        // Pairs with the writer's fence between setting `idle` and looking
        // at the queue: either it sees this operation or this sees `idle`.
        fence(Ordering::SeqCst);
        let backlog = seq.saturating_sub(self.shared.applied.load(Ordering::Relaxed));
        if prompt || self.shared.idle.load(Ordering::Relaxed) || backlog > QUEUE_CAPACITY as u64 / 2
        {
            self.waker.unpark();
        }
        Ok(seq)
    }

    /// Sends a write; a stopped writer (already reported by it) is logged.
    fn write(&self, op: Op) {
        if let Err(e) = self.send(op) {
            warn!(error = %e, "task record not written");
        }
    }

    /// Sends a read and waits for its answer.
    fn ask<T>(&self, make: impl FnOnce(SyncSender<T>) -> Op) -> Result<T, DbError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(make(reply))?;
        answer.recv().map_err(|_| {
            DbError::Storage(format!(
                "task database {}: writer stopped before answering",
                self.path.display()
            ))
        })
    }

    /// Frees, on this thread, what the writer handed back.
    fn free_trash(&self) {
        if self.shared.has_trash.load(Ordering::Relaxed)
            && self.shared.has_trash.swap(false, Ordering::Acquire)
        {
            let mut trash =
                std::mem::take(&mut *self.shared.trash.lock().unwrap_or_else(|e| e.into_inner()));
            trash.clear();
            let mut spare = self.shared.spare.lock().unwrap_or_else(|e| e.into_inner());
            if spare.capacity() < trash.capacity() {
                *spare = trash;
            }
        }
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// A handle telling which writes are committed, for the driver to hold
    /// replies back until their records are (see [`Durability`]).
    pub fn durability(&self) -> Durability {
        Durability(Arc::clone(&self.shared))
    }

    /// Waits until every write queued so far is committed.
    pub fn flush(&self) -> Result<(), DbError> {
        self.ask(|reply| Op::Commit { reply })?
    }

    /// Records in the writer's cache and their size.
    fn stats(&self) -> (usize, usize) {
        self.ask(|reply| Op::Stats { reply })
            .and_then(|r| r)
            .unwrap_or_default()
    }
}

impl Drop for SqliteDb {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.waker.unpark();
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            warn!(path = %self.path.display(), "task database writer panicked");
        }
    }
}

impl TaskDb for SqliteDb {
    fn add_request(&mut self, msg_id: &str, mut rec: TaskRecord) -> Result<(), DbError> {
        for key in BUFFER_KEYS {
            rec.fields.remove(key);
        }
        match rec.fields.get_mut("msg_id") {
            Some(Value::String(id)) if id == msg_id => {}
            Some(v) => *v = Value::String(msg_id.to_owned()),
            None => {
                rec.fields
                    .insert("msg_id".to_owned(), Value::String(msg_id.to_owned()));
            }
        }
        self.send(Op::Add {
            msg_id: msg_id.to_owned(),
            rec,
        })
        .map(drop)
    }

    fn update_record(
        &mut self,
        msg_id: &str,
        mut fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        fields.retain(|k, _| k != "msg_id" && !BUFFER_KEYS.contains(&k.as_str()));
        // A record not cached may still be on disk: the writer updates it if
        // it is there (a miss is not worth a round trip to report).
        self.send(Op::Update {
            msg_id: msg_id.to_owned(),
            fields,
            result_buffers,
        })
        .map(drop)
    }

    fn append_output(&mut self, msg_id: &str, name: &str, text: &str) {
        let name = match name {
            "stdout" => "stdout",
            "stderr" => "stderr",
            _ => return,
        };
        self.write(Op::Append {
            msg_id: msg_id.to_owned(),
            name,
            text: text.to_owned(),
        });
    }

    fn get_record(&self, msg_id: &str) -> Result<Cow<'_, TaskRecord>, DbError> {
        let id = msg_id.to_owned();
        match self.ask(|reply| Op::Get { msg_id: id, reply })?? {
            Some(rec) => Ok(Cow::Owned(rec)),
            None => Err(DbError::no_such(msg_id)),
        }
    }

    fn find_records(
        &self,
        query: &Value,
        keys: Option<&[String]>,
    ) -> Result<Vec<FoundRecord>, DbError> {
        Query::parse(query)?; // a bad query fails here, not in the writer
        let query = query.clone();
        let keys = keys.filter(|k| !k.is_empty()).map(<[String]>::to_vec);
        self.ask(|reply| Op::Find { query, keys, reply })?
    }

    fn drop_matching_records(&mut self, query: &Value) -> Result<usize, DbError> {
        Query::parse(query)?;
        let query = query.clone();
        self.ask(|reply| Op::Drop { query, reply })?
    }

    fn get_history(&self) -> Result<Vec<String>, DbError> {
        self.ask(|reply| Op::History { reply })?
    }

    fn len(&self) -> usize {
        self.stats().0
    }

    fn size_bytes(&self) -> usize {
        self.stats().1
    }
}

// ---------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------

type Reply<T> = SyncSender<Result<T, DbError>>;

enum Op {
    /// Insert, or merge into an existing record (`TaskDb::add_request`).
    Add {
        msg_id: String,
        rec: TaskRecord,
    },
    /// Update the record if there is one.
    Update {
        msg_id: String,
        fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    },
    /// Append to `stdout`/`stderr` if there is such a record.
    Append {
        msg_id: String,
        name: &'static str,
        text: String,
    },
    Get {
        msg_id: String,
        reply: Reply<Option<TaskRecord>>,
    },
    Find {
        query: Value,
        keys: Option<Vec<String>>,
        reply: Reply<Vec<FoundRecord>>,
    },
    /// Delete the matching records; answers how many.
    Drop {
        query: Value,
        reply: Reply<usize>,
    },
    History {
        reply: Reply<Vec<String>>,
    },
    /// Records cached and their size.
    Stats {
        reply: Reply<(usize, usize)>,
    },
    /// Commit now and answer.
    Commit {
        reply: Reply<()>,
    },
}

impl Op {
    /// Someone waits for the answer.
    fn is_read(&self) -> bool {
        !matches!(self, Op::Add { .. } | Op::Update { .. } | Op::Append { .. })
    }
}

/// The writer's copy of the most recently added records, oldest first in
/// `order`: writes apply to them in memory and reach the table when the
/// batch commits (or the record leaves the cache, or a query needs the
/// table current), one statement per record and batch however many
/// writes it had. A dropped record leaves its slot in `order` (finding it
/// would be O(n)); slots are swept when they outnumber the records.
struct Cache {
    limit: usize,
    records: HashMap<String, Entry>,
    order: VecDeque<String>,
    /// msg_ids whose entry became `New` or `Dirty` since the last flush, in
    /// that order: inserts happen in the order the records were added
    /// (rowids are insertion order).
    unwritten: Vec<String>,
}

struct Entry {
    rec: TaskRecord,
    disk: Disk,
}

/// How a cached record differs from its row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Disk {
    Clean,
    /// No row yet.
    New,
    /// These columns (`col_bit`) changed.
    Dirty(u32),
}

impl Cache {
    fn new(limit: usize) -> Self {
        Cache {
            limit,
            records: HashMap::new(),
            order: VecDeque::new(),
            unwritten: Vec::new(),
        }
    }

    /// Marks `columns` of a cached record changed.
    fn touch(&mut self, msg_id: &str, columns: u32) {
        let Some(e) = self.records.get_mut(msg_id) else {
            return;
        };
        e.disk = match e.disk {
            Disk::New => Disk::New,
            Disk::Dirty(c) => Disk::Dirty(c | columns),
            Disk::Clean if columns == 0 => Disk::Clean,
            Disk::Clean => {
                self.unwritten.push(msg_id.to_owned());
                Disk::Dirty(columns)
            }
        };
    }
}

/// The record keys stored as JSON text, in column order.
const JSON_KEYS: [&str; 20] = [
    "header",
    "metadata",
    "content",
    "submitted",
    "client_uuid",
    "engine_uuid",
    "started",
    "completed",
    "resubmitted",
    "received",
    "result_header",
    "result_metadata",
    "result_content",
    "queue",
    "execute_input",
    "execute_result",
    "error",
    "stdout",
    "stderr",
    "label",
];
const BUFFERS_BIT: u32 = 1 << 20;
const RESULT_BUFFERS_BIT: u32 = 1 << 21;
const EXTRA_BIT: u32 = 1 << 22;
const ALL_COLUMNS: u32 = (1 << 23) - 1;

/// The column (as a bit of a column set) that holds record key `key`.
fn col_bit(key: &str) -> u32 {
    let i = match key {
        "msg_id" => return 0,
        "buffers" => return BUFFERS_BIT,
        "result_buffers" => return RESULT_BUFFERS_BIT,
        "header" => 0,
        "metadata" => 1,
        "content" => 2,
        "submitted" => 3,
        "client_uuid" => 4,
        "engine_uuid" => 5,
        "started" => 6,
        "completed" => 7,
        "resubmitted" => 8,
        "received" => 9,
        "result_header" => 10,
        "result_metadata" => 11,
        "result_content" => 12,
        "queue" => 13,
        "execute_input" => 14,
        "execute_result" => 15,
        "error" => 16,
        "stdout" => 17,
        "stderr" => 18,
        "label" => 19,
        _ => return EXTRA_BIT,
    };
    1 << i
}

/// The column names of a column set, in bit order.
fn col_names(columns: u32) -> impl Iterator<Item = &'static str> {
    JSON_KEYS
        .into_iter()
        .chain(["buffers", "result_buffers", "extra"])
        .enumerate()
        .filter(move |(i, _)| columns & (1 << i) != 0)
        .map(|(_, c)| c)
}

/// One row's values, serialised into two reused buffers and bound to a
/// prepared statement without a per-column allocation.
#[derive(Default)]
struct RowBuf {
    text: Vec<u8>,
    blob: Vec<u8>,
    cols: Vec<Col>,
}

enum Col {
    Null,
    Text(usize, usize),
    Blob(usize, usize),
}

impl RowBuf {
    fn clear(&mut self) {
        self.text.clear();
        self.blob.clear();
        self.cols.clear();
    }

    /// A JSON column: SQL `NULL` for `null`.
    fn json(&mut self, v: &Value) {
        if v.is_null() {
            self.cols.push(Col::Null);
            return;
        }
        let at = self.text.len();
        serde_json::to_writer(&mut self.text, v).expect("a JSON value serialises");
        self.cols.push(Col::Text(at, self.text.len()));
    }

    fn text(&mut self, s: &str) {
        let at = self.text.len();
        self.text.extend_from_slice(s.as_bytes());
        self.cols.push(Col::Text(at, self.text.len()));
    }

    /// Frames as `[u64 LE length, bytes]…`.
    fn buffers(&mut self, buffers: &[Bytes]) {
        let at = self.blob.len();
        for b in buffers {
            self.blob.extend_from_slice(&(b.len() as u64).to_le_bytes());
            self.blob.extend_from_slice(b);
        }
        self.cols.push(Col::Blob(at, self.blob.len()));
    }

    /// The `extra` column: a JSON object of the keys outside
    /// ipyparallel's set, `NULL` when there are none.
    fn extra<'a>(&mut self, fields: impl Iterator<Item = (&'a String, &'a Value)>) {
        let at = self.text.len();
        for (k, v) in fields.filter(|(k, _)| !is_column(k)) {
            self.text
                .push(if self.text.len() == at { b'{' } else { b',' });
            serde_json::to_writer(&mut self.text, k).expect("a string serialises");
            self.text.push(b':');
            serde_json::to_writer(&mut self.text, v).expect("a JSON value serialises");
        }
        if self.text.len() == at {
            self.cols.push(Col::Null);
        } else {
            self.text.push(b'}');
            self.cols.push(Col::Text(at, self.text.len()));
        }
    }

    /// Binds the values in order and runs the statement.
    fn execute(&self, st: &mut rusqlite::Statement<'_>) -> rusqlite::Result<usize> {
        for (i, c) in self.cols.iter().enumerate() {
            let v = match *c {
                Col::Null => ValueRef::Null,
                Col::Text(a, b) => ValueRef::Text(&self.text[a..b]),
                Col::Blob(a, b) => ValueRef::Blob(&self.blob[a..b]),
            };
            st.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(v))?;
        }
        st.raw_execute()
    }
}

/// The writer's statements: SQL text made once (prepared statements are
/// looked up by it in rusqlite's cache) and the row buffer.
struct Rows {
    /// The table name, quoted for SQL.
    table: String,
    insert: String,
    select_one: String,
    exists: String,
    append: [String; 2],
    /// `UPDATE … SET <columns> WHERE msg_id = ?` by column set.
    update: HashMap<u32, String>,
    row: RowBuf,
}

impl Rows {
    fn new(table: String) -> Self {
        let all: Vec<&str> = std::iter::once("msg_id")
            .chain(col_names(ALL_COLUMNS))
            .collect();
        let marks: Vec<String> = (1..=all.len()).map(|i| format!("?{i}")).collect();
        let append = |name: &str| {
            // DictDB's rule: append to a string, start afresh over anything else.
            format!(
                "UPDATE {table} SET {name} = CASE WHEN json_type({name}) = 'text' \
                 THEN json_quote(json_extract({name}, '$') || ?1) ELSE json_quote(?1) END \
                 WHERE msg_id = ?2"
            )
        };
        Rows {
            insert: format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                all.join(", "),
                marks.join(", ")
            ),
            select_one: format!(
                "SELECT {} FROM {table} WHERE msg_id = ?",
                Columns::all().select()
            ),
            exists: format!("SELECT 1 FROM {table} WHERE msg_id = ?"),
            append: [append("stdout"), append("stderr")],
            update: HashMap::new(),
            row: RowBuf::default(),
            table,
        }
    }

    fn update_sql(&mut self, columns: u32) -> &str {
        let table = &self.table;
        self.update.entry(columns).or_insert_with(|| {
            let sets: Vec<String> = col_names(columns).map(|c| format!("{c} = ?")).collect();
            format!("UPDATE {table} SET {} WHERE msg_id = ?", sets.join(", "))
        })
    }

    /// Writes a cached record's changes to its row.
    fn write(&mut self, conn: &Connection, msg_id: &str, e: &Entry) -> rusqlite::Result<()> {
        let rec = &e.rec;
        match e.disk {
            Disk::Clean => Ok(()),
            Disk::New => {
                let row = &mut self.row;
                row.clear();
                row.text(msg_id);
                for k in JSON_KEYS {
                    row.json(rec.get(k));
                }
                row.buffers(&rec.buffers);
                row.buffers(&rec.result_buffers);
                row.extra(rec.fields.iter());
                let mut st = conn.prepare_cached(&self.insert)?;
                self.row.execute(&mut st).map(drop)
            }
            Disk::Dirty(columns) => {
                let row = &mut self.row;
                row.clear();
                for (i, k) in JSON_KEYS.iter().enumerate() {
                    if columns & (1 << i) != 0 {
                        row.json(rec.get(k));
                    }
                }
                if columns & BUFFERS_BIT != 0 {
                    row.buffers(&rec.buffers);
                }
                if columns & RESULT_BUFFERS_BIT != 0 {
                    row.buffers(&rec.result_buffers);
                }
                if columns & EXTRA_BIT != 0 {
                    row.extra(rec.fields.iter());
                }
                row.text(msg_id);
                let mut st = conn.prepare_cached(self.update_sql(columns))?;
                self.row.execute(&mut st).map(drop)
            }
        }
    }

    /// Updates a row that is not cached, if there is one.
    fn update_fields(
        &mut self,
        conn: &Connection,
        msg_id: &str,
        fields: &Map<String, Value>,
        result_buffers: Option<&[Bytes]>,
    ) -> rusqlite::Result<()> {
        let mut columns = fields.keys().fold(0, |c, k| c | col_bit(k)) & !BUFFERS_BIT;
        if result_buffers.is_some() {
            columns |= RESULT_BUFFERS_BIT;
        }
        if columns == 0 {
            return Ok(());
        }
        let mut extra = Map::new();
        if columns & EXTRA_BIT != 0 {
            // Keys outside ipyparallel's set (no caller sends them today).
            let sql = format!("SELECT extra FROM {} WHERE msg_id = ?", self.table);
            let old: Option<Option<String>> = conn
                .prepare_cached(&sql)?
                .query_row([msg_id], |r| r.get(0))
                .optional()?;
            let Some(old) = old else { return Ok(()) };
            if let Value::Object(old) = parse_json(old.as_deref()) {
                extra = old;
            }
            for (k, v) in fields {
                if !is_column(k) {
                    extra.insert(k.clone(), v.clone());
                }
            }
        }
        let row = &mut self.row;
        row.clear();
        for (i, k) in JSON_KEYS.iter().enumerate() {
            if columns & (1 << i) != 0 {
                row.json(fields.get(*k).unwrap_or(&Value::Null));
            }
        }
        if let Some(b) = result_buffers {
            row.buffers(b);
        }
        if columns & EXTRA_BIT != 0 {
            row.extra(extra.iter());
        }
        row.text(msg_id);
        let mut st = conn.prepare_cached(self.update_sql(columns))?;
        self.row.execute(&mut st).map(drop)
    }

    fn append(
        &self,
        conn: &Connection,
        msg_id: &str,
        name: &str,
        text: &str,
    ) -> rusqlite::Result<()> {
        let sql = &self.append[usize::from(name == "stderr")];
        conn.prepare_cached(sql)?
            .execute(rusqlite::params![text, msg_id])?;
        Ok(())
    }

    fn get(&self, conn: &Connection, msg_id: &str) -> rusqlite::Result<Option<TaskRecord>> {
        let cols = Columns::all();
        conn.prepare_cached(&self.select_one)?
            .query_row([msg_id], |r| cols.decode(r, 0))
            .optional()
    }

    fn exists(&self, conn: &Connection, msg_id: &str) -> rusqlite::Result<bool> {
        conn.prepare_cached(&self.exists)?.exists([msg_id])
    }
}

struct Writer {
    conn: Connection,
    /// The table name, quoted for SQL.
    table: String,
    path: PathBuf,
    batch_records: usize,
    batch_window: Duration,
    /// Free pages are waiting to be returned to the file system.
    vacuum_due: bool,
    shared: Arc<Shared>,
    cache: Cache,
    rows: Rows,
    /// Handed to the core's thread after each commit (see [`Shared::trash`]).
    trash: Vec<Trash>,
}

fn storage(e: rusqlite::Error) -> DbError {
    DbError::Storage(format!("task database: {e}"))
}

impl Writer {
    fn open(cfg: &SqliteConfig) -> Result<Writer, OpenError> {
        let path = cfg.path.clone();
        let err = |source| OpenError::Sqlite {
            path: path.clone(),
            source,
        };
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("creating {}: {e}", dir.display())),
                ))
            })?;
        }
        let conn = Connection::open(&cfg.path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        // auto_vacuum only takes effect on a database with no tables yet.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            warn!(path = %cfg.path.display(), mode, "task database is not in WAL mode");
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(err)?;
        conn.set_prepared_statement_cache_capacity(64);
        let table = quote_ident(&cfg.table);
        let mut cols = vec!["msg_id TEXT PRIMARY KEY NOT NULL".to_owned()];
        cols.extend(json_keys().map(|k| format!("{k} TEXT")));
        cols.extend(BUFFER_KEYS.iter().map(|k| format!("{k} BLOB")));
        cols.push("extra TEXT".into());
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} ({});",
            cols.join(", ")
        ))
        .map_err(err)?;
        let have: Vec<String> = {
            let mut st = conn
                .prepare(&format!(
                    "SELECT name FROM pragma_table_info({})",
                    sql_text(&cfg.table)
                ))
                .map_err(err)?;
            st.query_map([], |r| r.get(0))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?
        };
        let missing: Vec<String> = std::iter::once("msg_id")
            .chain(json_keys())
            .chain(BUFFER_KEYS)
            .chain(["extra"])
            .filter(|c| !have.iter().any(|h| h == c))
            .map(str::to_owned)
            .collect();
        if !missing.is_empty() {
            return Err(OpenError::NotATaskTable {
                path: cfg.path.clone(),
                table: cfg.table.clone(),
                missing,
            });
        }
        let auto_vacuum: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .map_err(err)?;
        if auto_vacuum != 2 {
            warn!(path = %cfg.path.display(), "task database was created without incremental auto-vacuum: purged records' space is reused but not returned to the file system (run VACUUM on it once to change that)");
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version != FORMAT_VERSION {
            conn.execute_batch(&format!("PRAGMA user_version = {FORMAT_VERSION};"))
                .map_err(err)?;
        }
        Ok(Writer {
            conn,
            rows: Rows::new(table.clone()),
            table,
            path: cfg.path.clone(),
            batch_records: cfg.batch_records.max(1),
            batch_window: cfg.batch_window,
            vacuum_due: true,
            shared: Arc::default(),
            cache: Cache::new(cfg.cache_records),
            trash: Vec::new(),
        })
    }

    /// The thread's loop: one transaction per batch, vacuum steps when idle.
    fn run(mut self, rx: Receiver<(u64, Op)>) {
        let mut closed = false;
        while !closed {
            // Idle: wait for the first operation of a batch.
            let first = loop {
                self.shared.idle.store(true, Ordering::Relaxed);
                // Pairs with the fence in `SqliteDb::send`.
                fence(Ordering::SeqCst);
                match rx.try_recv() {
                    Ok(op) => break Some(op),
                    Err(TryRecvError::Disconnected) => break None,
                    Err(TryRecvError::Empty) if self.vacuum_due => {
                        std::thread::park_timeout(VACUUM_IDLE);
                        match rx.try_recv() {
                            Ok(op) => break Some(op),
                            Err(TryRecvError::Disconnected) => break None,
                            Err(TryRecvError::Empty) => self.vacuum_step(),
                        }
                    }
                    // A bounded wait: a lost wake-up would only delay.
                    Err(TryRecvError::Empty) => std::thread::park_timeout(IDLE_WAIT),
                }
            };
            self.shared.idle.store(false, Ordering::Relaxed);
            let Some(first) = first else { break };
            if let Err(e) = self.conn.execute_batch("BEGIN") {
                warn!(path = %self.path.display(), error = %e, "task database: cannot begin a transaction");
            }
            let deadline = Instant::now() + self.batch_window;
            let mut n = 1;
            let mut commit_reply = self.apply(first);
            // Take what is queued; between, sleep until the window closes
            // (a read wakes the writer early).
            while n < self.batch_records && commit_reply.is_none() {
                match rx.try_recv() {
                    Ok(op) => {
                        n += 1;
                        commit_reply = self.apply(op);
                    }
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::park_timeout(left);
                    }
                }
            }
            let committed = self.commit(n);
            if let Some(reply) = commit_reply {
                let _ = reply.send(committed);
            }
            if self.vacuum_due {
                self.vacuum_step();
            }
        }
        // The store is gone: everything is committed; fold the WAL back in.
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            debug!(error = %e, "task database checkpoint at close failed");
        }
    }

    /// Writes the cached records' changes and commits the transaction.
    fn commit(&mut self, ops: usize) -> Result<(), DbError> {
        self.flush();
        let committed = self.conn.execute_batch("COMMIT").map_err(storage);
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        // Even a failed commit (reported below) releases the replies held
        // for it: a client must not wait for a write that will never happen.
        let applied = self.shared.applied.load(Ordering::Acquire);
        self.shared.durable.store(applied, Ordering::Release);
        self.shared.committed.notify_one();
        if let Err(e) = &committed {
            warn!(path = %self.path.display(), error = %e, ops, "task database: commit failed");
        }
        if !self.trash.is_empty() {
            let mut full = self.shared.trash.lock().unwrap_or_else(|e| e.into_inner());
            if full.is_empty() {
                std::mem::swap(&mut *full, &mut self.trash);
                drop(full);
                let mut spare = self.shared.spare.lock().unwrap_or_else(|e| e.into_inner());
                if spare.capacity() > self.trash.capacity() {
                    std::mem::swap(&mut *spare, &mut self.trash);
                }
            } else {
                // The core has not freed the last batch's yet.
                full.append(&mut self.trash);
            }
            self.shared.has_trash.store(true, Ordering::Release);
        }
        committed
    }

    /// Writes every cached record's changes to the table (in the open
    /// transaction).
    fn flush(&mut self) {
        let mut ids = std::mem::take(&mut self.cache.unwritten);
        for id in &ids {
            if let Some(e) = self.cache.records.get_mut(id) {
                if let Err(err) = self.rows.write(&self.conn, id, e) {
                    warn!(msg_id = %id, error = %err, "task record not written");
                }
                e.disk = Disk::Clean;
            }
        }
        ids.clear();
        self.cache.unwritten = ids;
    }

    /// Applies one operation; a `Commit` is handed back for the caller to
    /// answer after it commits.
    fn apply(&mut self, (seq, op): (u64, Op)) -> Option<Reply<()>> {
        let commit = self.apply_op(op);
        self.shared.applied.store(seq, Ordering::Release);
        commit
    }

    fn apply_op(&mut self, op: Op) -> Option<Reply<()>> {
        match op {
            Op::Add { msg_id, rec } => self.add(msg_id, rec),
            Op::Update {
                msg_id,
                fields,
                result_buffers,
            } => self.update(msg_id, fields, result_buffers),
            Op::Append { msg_id, name, text } => self.append(msg_id, name, text),
            Op::Get { msg_id, reply } => {
                let found = match self.cache.records.get(&msg_id) {
                    Some(e) => Ok(Some(e.rec.clone())),
                    None => self.rows.get(&self.conn, &msg_id).map_err(storage),
                };
                let _ = reply.send(found);
            }
            Op::Find { query, keys, reply } => {
                self.flush();
                let _ = reply.send(self.find(&query, keys.as_deref()));
            }
            Op::Drop { query, reply } => {
                self.flush();
                let dropped = self.drop_matching(&query).map(|ids| {
                    for id in &ids {
                        if let Some((key, e)) = self.cache.records.remove_entry(id) {
                            self.trash.push(Trash::Record(key, e.rec));
                        }
                    }
                    ids.len()
                });
                let _ = reply.send(dropped);
            }
            Op::History { reply } => {
                self.flush();
                let _ = reply.send(self.history());
            }
            Op::Stats { reply } => {
                let records = &self.cache.records;
                let size = records.values().map(|e| record_size(&e.rec)).sum();
                let _ = reply.send(Ok((records.len(), size)));
            }
            Op::Commit { reply } => return Some(reply),
        }
        None
    }

    /// `TaskDb::add_request`: a new record is cached (its row written at
    /// the commit); a repeated msg_id merges with the cached record, or
    /// with the row when the record has left the cache.
    fn add(&mut self, msg_id: String, mut rec: TaskRecord) {
        if let Some(e) = self.cache.records.get_mut(&msg_id) {
            merge_request(&e.rec.fields, &mut rec.fields);
            merge_fields(&mut e.rec, &mut rec.fields, &mut self.trash);
            let old = std::mem::replace(&mut e.rec.buffers, std::mem::take(&mut rec.buffers));
            self.trash.push(Trash::Buffers(old));
            self.trash.push(Trash::Record(msg_id.clone(), rec));
            self.cache.touch(&msg_id, ALL_COLUMNS);
            return;
        }
        let on_disk = match self.rows.exists(&self.conn, &msg_id) {
            Ok(true) => self.rows.get(&self.conn, &msg_id),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        let entry = match on_disk {
            Ok(None) => Entry {
                rec,
                disk: Disk::New,
            },
            Ok(Some(mut existing)) => {
                merge_request(&existing.fields, &mut rec.fields);
                merge_fields(&mut existing, &mut rec.fields, &mut self.trash);
                existing.buffers = std::mem::take(&mut rec.buffers);
                self.trash.push(Trash::Record(String::new(), rec));
                Entry {
                    rec: existing,
                    disk: Disk::Dirty(ALL_COLUMNS),
                }
            }
            Err(e) => {
                warn!(msg_id = %msg_id, error = %e, "task record not written");
                self.trash.push(Trash::Record(msg_id, rec));
                return;
            }
        };
        self.cache.order.push_back(msg_id.clone());
        self.cache.unwritten.push(msg_id.clone());
        self.cache.records.insert(msg_id, entry);
        self.evict();
    }

    /// Leaves the cache within its limit, writing what leaves it first.
    fn evict(&mut self) {
        while self.cache.records.len() > self.cache.limit {
            let Some(old) = self.cache.order.pop_front() else {
                break;
            };
            if let Some((key, e)) = self.cache.records.remove_entry(&old) {
                if let Err(err) = self.rows.write(&self.conn, &key, &e) {
                    warn!(msg_id = %key, error = %err, "task record not written");
                }
                self.trash.push(Trash::Record(key, e.rec));
            }
        }
        let cache = &mut self.cache;
        if cache.order.len() > 2 * cache.records.len() + 64 {
            let records = &cache.records;
            cache.order.retain(|id| records.contains_key(id));
        }
    }

    fn update(
        &mut self,
        msg_id: String,
        mut fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    ) {
        if let Some(e) = self.cache.records.get_mut(&msg_id) {
            let mut columns = fields.keys().fold(0, |c, k| c | col_bit(k));
            merge_fields(&mut e.rec, &mut fields, &mut self.trash);
            if let Some(b) = result_buffers {
                columns |= RESULT_BUFFERS_BIT;
                let old = std::mem::replace(&mut e.rec.result_buffers, b);
                self.trash.push(Trash::Buffers(old));
            }
            self.cache.touch(&msg_id, columns);
        } else {
            // A record not cached may still be on disk: update it there.
            if let Err(e) =
                self.rows
                    .update_fields(&self.conn, &msg_id, &fields, result_buffers.as_deref())
            {
                warn!(msg_id = %msg_id, error = %e, "task record not updated");
            }
            if let Some(b) = result_buffers {
                self.trash.push(Trash::Buffers(b));
            }
        }
        self.trash.push(Trash::Fields(fields));
        self.trash.push(Trash::Text(msg_id));
    }

    fn append(&mut self, msg_id: String, name: &'static str, text: String) {
        if let Some(e) = self.cache.records.get_mut(&msg_id) {
            // DictDB's rule: append to a string, start afresh over anything else.
            match e.rec.fields.get_mut(name) {
                Some(Value::String(s)) => s.push_str(&text),
                Some(v) => {
                    let old = std::mem::replace(v, Value::String(text.clone()));
                    self.trash.push(Trash::Value(old));
                }
                None => {
                    e.rec
                        .fields
                        .insert(name.to_owned(), Value::String(text.clone()));
                }
            }
            self.cache.touch(&msg_id, col_bit(name));
        } else if let Err(e) = self.rows.append(&self.conn, &msg_id, name, &text) {
            warn!(msg_id = %msg_id, error = %e, "task output not written");
        }
        self.trash.push(Trash::Text(text));
        self.trash.push(Trash::Text(msg_id));
    }

    /// `(rowid, msg_id)` of the records matching `query`, oldest first.
    fn matching(&self, query: &Query<'_>) -> Result<Vec<(i64, String)>, DbError> {
        // Decode only the columns the query looks at.
        let wanted: Vec<&str> = query.keys().collect();
        let cols = Columns::for_keys(wanted.iter().copied());
        let select = format!("rowid, {}", cols.select());
        let mut found = Vec::new();
        let mut test = |row: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
            let rowid: i64 = row.get(0)?;
            let rec = cols.decode(row, 1)?;
            if query.matches(&rec) {
                let id = rec.get("msg_id").as_str().unwrap_or_default().to_owned();
                found.push((rowid, id));
            }
            Ok(())
        };
        if let Some(ids) = query.msg_id_candidates() {
            let sql = format!("SELECT {select} FROM {} WHERE msg_id = ?", self.table);
            let mut st = self.conn.prepare_cached(&sql).map_err(storage)?;
            for id in ids {
                let mut rows = st.query([id]).map_err(storage)?;
                while let Some(row) = rows.next().map_err(storage)? {
                    test(row).map_err(storage)?;
                }
            }
            found.sort_by_key(|(rowid, _)| *rowid);
            found.dedup_by_key(|(rowid, _)| *rowid);
            return Ok(found);
        }
        let mut conds = Vec::new();
        let mut args = Vec::new();
        for (key, p) in query.prefilters() {
            if key == "msg_id" {
                match p {
                    Prefilter::IsNull => conds.push("0".to_owned()),
                    Prefilter::NotNull => {}
                    Prefilter::IsString(s) => {
                        conds.push("msg_id = ?".into());
                        args.push(SqlValue::Text(s.to_owned()));
                    }
                }
                continue;
            }
            if !is_column(key) || BUFFER_KEYS.contains(&key) {
                continue;
            }
            match p {
                Prefilter::IsNull => conds.push(format!("{key} IS NULL")),
                Prefilter::NotNull => conds.push(format!("{key} IS NOT NULL")),
                Prefilter::IsString(s) => {
                    conds.push(format!("json_extract({key}, '$') = ?"));
                    args.push(SqlValue::Text(s.to_owned()));
                }
            }
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT {select} FROM {} {filter} ORDER BY rowid",
            self.table
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(storage)?;
        let mut rows = st.query(params_from_iter(args)).map_err(storage)?;
        while let Some(row) = rows.next().map_err(storage)? {
            test(row).map_err(storage)?;
        }
        Ok(found)
    }

    fn find(&self, query: &Value, keys: Option<&[String]>) -> Result<Vec<FoundRecord>, DbError> {
        let parsed = Query::parse(query)?;
        let matching = self.matching(&parsed)?;
        let cols = match keys {
            Some(keys) => Columns::for_keys(keys.iter().map(String::as_str)),
            None => Columns::all(),
        };
        let sql = format!(
            "SELECT {} FROM {} WHERE rowid = ?",
            cols.select(),
            self.table
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(storage)?;
        let mut out = Vec::with_capacity(matching.len());
        for (rowid, _) in matching {
            let rec: Option<TaskRecord> = st
                .query_row([rowid], |r| cols.decode(r, 0))
                .optional()
                .map_err(storage)?;
            if let Some(rec) = rec {
                out.push(project(&rec, keys)?);
            }
        }
        Ok(out)
    }

    fn drop_matching(&mut self, query: &Value) -> Result<Vec<String>, DbError> {
        let parsed = Query::parse(query)?;
        let matching = self.matching(&parsed)?;
        let sql = format!("DELETE FROM {} WHERE rowid = ?", self.table);
        let mut st = self.conn.prepare_cached(&sql).map_err(storage)?;
        for (rowid, _) in &matching {
            st.execute([rowid]).map_err(storage)?;
        }
        if !matching.is_empty() {
            self.vacuum_due = true;
        }
        Ok(matching.into_iter().map(|(_, id)| id).collect())
    }

    fn history(&self) -> Result<Vec<String>, DbError> {
        let sql = format!(
            "SELECT msg_id, submitted FROM {} WHERE submitted IS NOT NULL ORDER BY rowid",
            self.table
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(storage)?;
        let rows: Vec<(String, Value)> = st
            .query_map([], |r| {
                let id: String = r.get(0)?;
                let submitted: Option<String> = r.get(1)?;
                Ok((id, parse_json(submitted.as_deref())))
            })
            .map_err(storage)?
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        Ok(history_order(rows.iter().map(|(id, s)| (s, id.as_str()))))
    }

    /// Returns up to [`VACUUM_PAGES`] free pages to the file system.
    fn vacuum_step(&mut self) {
        let free: i64 = match self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "task database: freelist_count failed");
                self.vacuum_due = false;
                return;
            }
        };
        if free == 0 {
            self.vacuum_due = false;
            return;
        }
        // Each step of this statement frees one page: run it to the end.
        let freed = self
            .conn
            .prepare(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))
            .and_then(|mut st| {
                let mut rows = st.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            });
        if let Err(e) = freed {
            debug!(error = %e, "task database: incremental_vacuum failed");
            self.vacuum_due = false;
            return;
        }
        // The file shrinks when the WAL is folded back in.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    }
}

/// The columns to read for a set of record keys, and how to decode them.
struct Columns {
    /// Record keys stored in JSON columns, in select order after `msg_id`.
    json: Vec<&'static str>,
    buffers: bool,
    result_buffers: bool,
    extra: bool,
}

impl Columns {
    fn all() -> Self {
        Columns {
            json: json_keys().collect(),
            buffers: true,
            result_buffers: true,
            extra: true,
        }
    }

    fn for_keys<'k>(keys: impl Iterator<Item = &'k str>) -> Self {
        let mut c = Columns {
            json: Vec::new(),
            buffers: false,
            result_buffers: false,
            extra: false,
        };
        for key in keys {
            match key {
                "msg_id" => {}
                "buffers" => c.buffers = true,
                "result_buffers" => c.result_buffers = true,
                k => match json_keys().find(|j| *j == k) {
                    Some(j) if !c.json.contains(&j) => c.json.push(j),
                    Some(_) => {}
                    None => c.extra = true,
                },
            }
        }
        c
    }

    fn select(&self) -> String {
        let mut cols = vec!["msg_id"];
        cols.extend(&self.json);
        if self.buffers {
            cols.push("buffers");
        }
        if self.result_buffers {
            cols.push("result_buffers");
        }
        if self.extra {
            cols.push("extra");
        }
        cols.join(", ")
    }

    /// A record with the selected keys, from the row's columns starting at `at`.
    fn decode(&self, row: &rusqlite::Row<'_>, mut at: usize) -> rusqlite::Result<TaskRecord> {
        let mut rec = TaskRecord::default();
        let msg_id: String = row.get(at)?;
        at += 1;
        rec.fields.insert("msg_id".into(), Value::String(msg_id));
        for key in &self.json {
            let text: Option<String> = row.get(at)?;
            at += 1;
            rec.fields
                .insert((*key).into(), parse_json(text.as_deref()));
        }
        if self.buffers {
            let blob: Option<Vec<u8>> = row.get(at)?;
            at += 1;
            rec.buffers = decode_buffers(blob.as_deref());
        }
        if self.result_buffers {
            let blob: Option<Vec<u8>> = row.get(at)?;
            at += 1;
            rec.result_buffers = decode_buffers(blob.as_deref());
        }
        if self.extra {
            let text: Option<String> = row.get(at)?;
            if let Value::Object(extra) = parse_json(text.as_deref()) {
                for (k, v) in extra {
                    rec.fields.entry(k).or_insert(v);
                }
            }
        }
        Ok(rec)
    }
}

fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn parse_json(text: Option<&str>) -> Value {
    match text {
        None => Value::Null,
        Some(t) => serde_json::from_str(t).unwrap_or_else(|e| {
            // Not written by us: keep the text rather than lose it.
            debug!(error = %e, "task database: a column is not JSON");
            Value::String(t.to_owned())
        }),
    }
}

fn decode_buffers(blob: Option<&[u8]>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let Some(mut rest) = blob else {
        return out;
    };
    while rest.len() >= 8 {
        let (len, tail) = rest.split_at(8);
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        if tail.len() < len {
            warn!("task database: truncated buffers column");
            break;
        }
        let (buf, tail) = tail.split_at(len);
        out.push(Bytes::copy_from_slice(buf));
        rest = tail;
    }
    out
}

/// Shallow-merges `fields` into `rec`, moving the values out (the emptied
/// map and the replaced values go to `trash`, to be freed where they were
/// allocated).
fn merge_fields(rec: &mut TaskRecord, fields: &mut Map<String, Value>, trash: &mut Vec<Trash>) {
    for (k, v) in fields.iter_mut() {
        let v = std::mem::take(v);
        match rec.fields.get_mut(k) {
            Some(slot) => {
                let old = std::mem::replace(slot, v);
                if !old.is_null() {
                    trash.push(Trash::Value(old));
                }
            }
            None => {
                rec.fields.insert(k.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DbBackend, RecordStore};
    use serde_json::json;
    use std::path::Path;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "parallax-sqlite-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("tasks.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(path: &Path, cache: usize) -> SqliteDb {
        let mut cfg = SqliteConfig::new(path.to_path_buf());
        cfg.cache_records = cache;
        SqliteDb::open(&cfg).unwrap()
    }

    fn task(msg_id: &str, submitted: Option<&str>, extra: Value) -> TaskRecord {
        let mut rec = RecordStore::empty_record(msg_id);
        rec.fields.insert(
            "submitted".into(),
            submitted.map_or(Value::Null, |s| json!(s)),
        );
        if let Value::Object(extra) = extra {
            rec.fields.extend(extra);
        }
        rec
    }

    fn fields(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    /// The same writes, in the same order, to any store: requests (one
    /// repeated), results with buffers, output appended, non-standard keys.
    fn populate(db: &mut dyn TaskDb) {
        let rows = [
            (
                "a",
                Some("2026-11-22T00:00:01.000000Z"),
                json!({"n": 1, "label": "group_a", "engine_uuid": "e-1", "queue": "task"}),
            ),
            (
                "b",
                Some("2026-11-22T00:00:02Z"),
                json!({"n": 2.5, "label": "group_a/sub_x", "engine_uuid": "e-2", "queue": "mux"}),
            ),
            (
                "c",
                Some("2026-11-22T02:00:03+02:00"),
                json!({"n": -7, "label": "group_b", "tags": ["x", "y"], "engine_uuid": "e-1"}),
            ),
            (
                "d",
                Some("2026-11-22T00:00:04.123456+00:00"),
                json!({"n": "4", "label": "label*task", "tags": ["y"]}),
            ),
            ("e", None, json!({"label": null})),
            (
                "f",
                Some("2026-11-22T00:00:00.5Z"),
                json!({"label": "2026-11-22T00:00:00Z", "header": {"msg_id": "f", "date": "2026-11-22T00:00:00.5Z"}}),
            ),
        ];
        for (id, submitted, extra) in rows {
            let mut rec = task(id, submitted, extra);
            rec.buffers = vec![
                Bytes::from(format!("req-{id}")),
                Bytes::from_static(b"\0\x01"),
            ];
            db.add_request(id, rec).unwrap();
        }
        // Results for a, c, f: `completed` dates, result buffers.
        for (id, completed) in [
            ("a", "2026-11-22T00:00:05Z"),
            ("c", "2026-11-22T00:00:09.5+00:00"),
            ("f", "2026-11-22T00:00:01Z"),
        ] {
            db.update_record(
                id,
                fields(json!({
                    "completed": completed,
                    "result_content": {"status": "ok", "n": id},
                    "msg_id": "ignored",
                    "buffers": "ignored",
                })),
                Some(vec![Bytes::from(format!("result-{id}"))]),
            )
            .unwrap();
        }
        db.append_output("a", "stdout", "hello ");
        db.append_output("a", "stdout", "world\n");
        db.append_output("c", "stderr", "warn\n");
        db.append_output("zz", "stdout", "nobody's");
        db.update_record("d", fields(json!({"stdout": {"odd": 1}})), None)
            .unwrap();
        db.append_output("d", "stdout", "fresh");
        // A repeated msg_id: empty values keep what was there.
        let mut again = task(
            "b",
            Some("2026-11-22T00:00:02Z"),
            json!({"engine_uuid": null}),
        );
        again.buffers = vec![Bytes::from_static(b"second")];
        db.add_request("b", again).unwrap();
    }

    const QUERIES: &[&str] = &[
        r#"{}"#,
        r#"{"msg_id": "c"}"#,
        r#"{"msg_id": {"$in": ["d", "a", "zz", "a"]}}"#,
        r#"{"msg_id": {"$in": ["e", "c"]}, "completed": {"$ne": null}}"#,
        r#"{"msg_id": {"$in": ["a", "b"], "$ne": "a"}}"#,
        r#"{"msg_id": {"$in": ["2026-01-01T00:00:00Z", "a"]}}"#,
        r#"{"msg_id": {"$nin": ["d", "a"]}}"#,
        r#"{"completed": {"$ne": null}}"#,
        r#"{"completed": null}"#,
        r#"{"completed": {"$exists": true}}"#,
        r#"{"completed": {"$exists": false}}"#,
        r#"{"completed": {"$gt": "2026-11-22T00:00:04Z"}}"#,
        r#"{"completed": {"$lt": "2026-11-22T01:00:04+01:00"}}"#,
        r#"{"completed": {"$in": [null, "2026-11-22T00:00:05+00:00"]}}"#,
        r#"{"submitted": {"$gte": "2026-11-22T00:00:02Z", "$lte": "2026-11-22T00:00:04.123456Z"}}"#,
        r#"{"engine_uuid": "e-1"}"#,
        r#"{"engine_uuid": "e-1", "completed": {"$ne": null}}"#,
        r#"{"engine_uuid": {"$eq": "e-2"}}"#,
        r#"{"label": "2026-11-22T01:00:00+01:00"}"#,
        r#"{"label": {"$glob": "group_a*"}}"#,
        r#"{"label": {"$in": "xx group_b yy"}}"#,
        r#"{"label": null}"#,
        r#"{"n": {"$in": [1, 2.5, "4"]}}"#,
        r#"{"n": {"$mod": [2, 1]}}"#,
        r#"{"n": {"$lt": 2}}"#,
        r#"{"tags": {"$all": ["y"]}}"#,
        r#"{"tags": {"$exists": false}}"#,
        r#"{"stdout": "hello world\n"}"#,
        r#"{"stdout": {"$glob": "*fresh*"}}"#,
        r#"{"stderr": {"$ne": ""}}"#,
        r#"{"queue": {"$nin": ["mux"]}, "submitted": {"$ne": null}}"#,
        r#"{"header.msg_id": "f"}"#,
        r#"{"result_content": {"$eq": {"status": "ok", "n": "a"}}}"#,
    ];

    const KEYS: &[&[&str]] = &[
        &[],
        &["msg_id"],
        &["completed", "stdout", "stderr"],
        &["buffers", "result_buffers", "result_content"],
        &["n", "tags"],
        &["header", "submitted", "label"],
    ];

    /// CPU seconds of this process's threads named `name` (Linux only).
    fn thread_cpu(name: &str) -> f64 {
        let mut total = 0.0;
        for t in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<f64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            total += (f[11] + f[12]) / 100.0; // utime + stime, in ticks
        }
        total
    }

    /// The writer's CPU per load-balanced task (a request, its assignment,
    /// its result; 2000 in flight, as `parallax bench engines --tasks`):
    /// `cargo test --release -p parallax-hub writer_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark"]
    fn writer_cost() {
        let dir = TempDir::new("cost");
        let mut db = open(&dir.db(), 1024);
        let (n, in_flight) = (100_000usize, 2000usize);
        let session = "3f0c1b0e-5e1a-4c2b-9d55-0a8f1f2e3d4c";
        let start = Instant::now();
        for i in 0..n + in_flight {
            if i < n {
                let id = format!("{session}_{i}");
                let mut rec = RecordStore::empty_record(&id);
                let f = &mut rec.fields;
                f.insert(
                    "header".into(),
                    json!({"msg_id": id, "msg_type": "apply_request", "username": "bench",
                        "session": session, "date": "2026-12-06T03:20:00.123456Z",
                        "version": "5.3"}),
                );
                f.insert(
                    "metadata".into(),
                    json!({"after": [], "follow": [], "timeout": null, "targets": [],
                        "retries": 0}),
                );
                f.insert("content".into(), json!({}));
                f.insert("submitted".into(), json!("2026-12-06T03:20:00.123456Z"));
                f.insert("client_uuid".into(), json!(session));
                f.insert("queue".into(), json!("task"));
                rec.buffers = vec![Bytes::from(vec![1u8; 64]), Bytes::from(vec![2u8; 32])];
                db.add_request(&id, rec).unwrap();
                db.update_record(&id, fields(json!({"engine_uuid": "e-7"})), None)
                    .unwrap();
            }
            if i >= in_flight {
                let id = format!("{session}_{}", i - in_flight);
                let result = json!({
                    "result_header": {"msg_id": format!("r{i}"), "msg_type": "apply_reply",
                        "username": "bench", "session": "e-7",
                        "date": "2026-12-06T03:20:00.223456Z", "version": "5.3"},
                    "result_metadata": {"started": "2026-12-06T03:20:00.200000Z",
                        "dependencies_met": true, "engine": "e-7", "is_broadcast": false,
                        "is_coalescing": false, "status": "ok",
                        "completed": "2026-12-06T03:20:00.223456Z"},
                    "result_content": {"status": "ok", "execution_count": 1},
                    "received": "2026-12-06T03:20:00.233456Z",
                    "started": "2026-12-06T03:20:00.200000Z",
                    "completed": "2026-12-06T03:20:00.223456Z",
                    "engine_uuid": "e-7",
                });
                db.update_record(&id, fields(result), Some(vec![Bytes::from(vec![3u8; 48])]))
                    .unwrap();
            }
        }
        db.flush().unwrap();
        let wall = start.elapsed().as_secs_f64();
        let writer = thread_cpu("parallax-sqlite");
        eprintln!(
            "{n} tasks: {:.1} us/task wall, writer thread {:.1} us/task CPU, {} commits",
            1e6 * wall / n as f64,
            1e6 * writer / n as f64,
            db.commits()
        );
    }

    #[test]
    fn json_columns_are_the_record_keys_but_msg_id_and_buffers() {
        let want: Vec<&str> = RECORD_KEYS
            .into_iter()
            .filter(|k| *k != "msg_id" && !BUFFER_KEYS.contains(k))
            .collect();
        assert_eq!(JSON_KEYS.to_vec(), want);
        assert_eq!(col_names(ALL_COLUMNS).count(), JSON_KEYS.len() + 3);
        for (i, k) in JSON_KEYS.iter().enumerate() {
            assert_eq!(col_bit(k), 1 << i, "{k}");
        }
        assert_eq!(col_bit("custom"), EXTRA_BIT);
    }

    #[test]
    fn queries_match_the_in_memory_store() {
        // No cache, a cache of 2 (most records leave it before their
        // results arrive) and one that holds every record.
        for cache in [0, 2, 100] {
            queries_match_with_cache(cache);
        }
    }

    fn queries_match_with_cache(cache: usize) {
        let dir = TempDir::new("parity");
        let mut mem = RecordStore::new(DbBackend::default());
        let mut disk = open(&dir.db(), cache);
        populate(&mut mem);
        populate(&mut disk);
        for q in QUERIES {
            let query: Value = serde_json::from_str(q).unwrap();
            for keys in KEYS {
                let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                let want = TaskDb::find_records(&mem, &query, Some(&keys));
                let got = disk.find_records(&query, Some(&keys));
                assert_eq!(got, want, "query {q} keys {keys:?}");
            }
            let want = TaskDb::find_records(&mem, &query, None).unwrap();
            assert_eq!(disk.find_records(&query, None).unwrap(), want, "{q}");
        }
        for id in ["a", "b", "c", "d", "e", "f", "zz"] {
            let want = TaskDb::get_record(&mem, id).map(Cow::into_owned);
            let got = disk.get_record(id).map(Cow::into_owned);
            assert_eq!(got, want, "{id}");
        }
        assert_eq!(disk.get_history(), TaskDb::get_history(&mem));
        // Bad queries fail alike, before touching any record.
        for q in [
            json!({"n": {"$in": 3}}),
            json!({"n": {"$where": "x"}}),
            json!({"$or": []}),
            json!([1]),
            json!({"n": {"$mod": [0, 1]}}),
        ] {
            let want = TaskDb::find_records(&mem, &q, None).unwrap_err();
            assert_eq!(disk.find_records(&q, None).unwrap_err(), want, "{q}");
        }
        let err = disk
            .find_records(&json!({"msg_id": "a"}), Some(&["nope".to_string()]))
            .unwrap_err();
        assert_eq!(err.ename(), "KeyError");
    }

    #[test]
    fn purge_matches_the_in_memory_store_and_persists() {
        for cache in [3, 100] {
            purge_matches_with_cache(cache);
        }
    }

    fn purge_matches_with_cache(cache: usize) {
        let dir = TempDir::new("purge");
        let mut mem = RecordStore::new(DbBackend::default());
        let mut disk = open(&dir.db(), cache);
        populate(&mut mem);
        populate(&mut disk);
        for q in [
            json!({"engine_uuid": "e-1", "completed": {"$ne": null}}),
            json!({"msg_id": {"$in": ["b", "zz"]}}),
        ] {
            assert_eq!(
                disk.drop_matching_records(&q),
                TaskDb::drop_matching_records(&mut mem, &q)
            );
            let all = json!({});
            assert_eq!(
                disk.find_records(&all, None),
                TaskDb::find_records(&mem, &all, None)
            );
        }
        assert!(disk.get_record("a").is_err());
        drop(disk);
        let disk = open(&dir.db(), cache);
        let left: Vec<String> = disk
            .find_records(&json!({}), Some(&["msg_id".to_string()]))
            .unwrap()
            .iter()
            .map(|r| r.fields["msg_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(left, ["d", "e", "f"]);
    }

    #[test]
    fn records_survive_a_restart() {
        let dir = TempDir::new("restart");
        let mut mem = RecordStore::new(DbBackend::default());
        populate(&mut mem);
        {
            let mut disk = open(&dir.db(), 100);
            populate(&mut disk);
            // dropped without a flush: closing commits what is queued
        }
        let disk = open(&dir.db(), 100);
        assert_eq!(disk.len(), 0, "a fresh cache");
        assert_eq!(
            disk.find_records(&json!({}), None),
            TaskDb::find_records(&mem, &json!({}), None)
        );
        assert_eq!(disk.get_history(), TaskDb::get_history(&mem));
        let a = disk.get_record("a").unwrap();
        assert_eq!(a.result_buffers, [Bytes::from_static(b"result-a")]);
        assert_eq!(a.get("stdout"), &json!("hello world\n"));
        drop(a);
        drop(disk);
        // The WAL was folded back in at close.
        let wal = dir.0.join("tasks.db-wal");
        assert!(std::fs::metadata(&wal).map_or(0, |m| m.len()) == 0);
    }

    #[test]
    fn writes_are_batched_and_visible_before_commit() {
        let dir = TempDir::new("batch");
        let mut cfg = SqliteConfig::new(dir.db());
        cfg.cache_records = 16;
        // A long window: nothing commits by time during the test.
        cfg.batch_window = Duration::from_secs(30);
        cfg.batch_records = 1000;
        let mut db = SqliteDb::open(&cfg).unwrap();
        let n = 2400;
        for i in 0..n {
            let id = format!("t{i}");
            db.add_request(&id, task(&id, Some("2026-11-22T00:00:01Z"), json!({})))
                .unwrap();
            db.update_record(
                &id,
                fields(json!({"completed": "2026-11-22T00:00:02Z"})),
                None,
            )
            .unwrap();
        }
        // 4800 writes: four full batches committed; the rest is in the open
        // transaction, which a query sees (same connection, in order).
        let found = db
            .find_records(
                &json!({"completed": {"$ne": null}}),
                Some(&["msg_id".into()]),
            )
            .unwrap();
        assert_eq!(found.len(), n);
        assert_eq!(db.commits(), 4);
        // Another connection sees only what is committed.
        let other = Connection::open(dir.db()).unwrap();
        let committed: i64 = other
            .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert!(committed < n as i64, "{committed}");
        db.flush().unwrap();
        assert_eq!(db.commits(), 5);
        let committed: i64 = other
            .query_row(
                "SELECT count(*) FROM tasks WHERE completed IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(committed, n as i64);
        // The cache holds the most recent records only.
        assert_eq!(db.len(), 16);
        assert!(db.size_bytes() > 0);
    }

    #[test]
    fn purged_space_is_returned_to_the_file_system() {
        let dir = TempDir::new("vacuum");
        let mut db = open(&dir.db(), 8);
        let big = Bytes::from(vec![7u8; 256 * 1024]);
        for i in 0..64 {
            let id = format!("t{i}");
            let mut rec = task(
                &id,
                Some("2026-11-22T00:00:01Z"),
                json!({"completed": "2026-11-22T00:00:02Z"}),
            );
            rec.buffers = vec![big.clone()];
            db.add_request(&id, rec).unwrap();
        }
        db.flush().unwrap();
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        // Fold the WAL into the file to see its full size.
        Connection::open(dir.db())
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let full = size(&dir.db());
        assert!(full > 16 << 20, "{full}");
        assert_eq!(
            db.drop_matching_records(&json!({"completed": {"$ne": null}})),
            Ok(64)
        );
        // Freed a slice at a time by the idle writer.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now_size = size(&dir.db());
            if now_size < full / 8 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "file still {now_size} bytes (was {full})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(db.find_records(&json!({}), None), Ok(vec![]));
    }

    #[test]
    fn updates_reach_records_no_longer_cached() {
        let dir = TempDir::new("evicted");
        let mut db = open(&dir.db(), 1);
        db.add_request("old", task("old", Some("2026-11-22T00:00:01Z"), json!({})))
            .unwrap();
        db.add_request("new", task("new", Some("2026-11-22T00:00:02Z"), json!({})))
            .unwrap();
        assert_eq!(db.len(), 1);
        db.append_output("old", "stdout", "a\"b\n");
        db.append_output("old", "stdout", "\u{e9}\u{1}");
        db.update_record(
            "old",
            fields(json!({"completed": "2026-11-22T00:00:03Z", "custom": [1]})),
            Some(vec![Bytes::from_static(b"r")]),
        )
        .unwrap();
        let old = db.get_record("old").unwrap().into_owned();
        assert_eq!(old.get("stdout"), &json!("a\"b\n\u{e9}\u{1}"));
        assert_eq!(old.get("completed"), &json!("2026-11-22T00:00:03Z"));
        assert_eq!(old.get("custom"), &json!([1]));
        assert_eq!(old.result_buffers, [Bytes::from_static(b"r")]);
        // A repeated msg_id merges with the record on disk.
        db.add_request("old", task("old", None, json!({"label": "x"})))
            .unwrap();
        let old = db.get_record("old").unwrap().into_owned();
        assert_eq!(old.get("submitted"), &json!("2026-11-22T00:00:01Z"));
        assert_eq!(old.get("label"), &json!("x"));
        assert_eq!(old.get("stdout"), &json!("a\"b\n\u{e9}\u{1}"));
        assert_eq!(
            db.find_records(&json!({}), Some(&["msg_id".into()]))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_foreign_table_is_refused_and_names_are_quoted() {
        let dir = TempDir::new("foreign");
        Connection::open(dir.db())
            .unwrap()
            .execute_batch("CREATE TABLE tasks (id INTEGER); CREATE TABLE \"odd\"\"name\" (x);")
            .unwrap();
        let err = SqliteDb::open(&SqliteConfig::new(dir.db())).unwrap_err();
        assert!(err.to_string().contains("--table"), "{err}");
        let mut cfg = SqliteConfig::new(dir.db());
        cfg.table = "runs; DROP TABLE tasks".into();
        let mut db = SqliteDb::open(&cfg).unwrap();
        db.add_request("a", task("a", Some("2026-11-22T00:00:01Z"), json!({})))
            .unwrap();
        assert_eq!(db.get_history(), Ok(vec!["a".to_string()]));
        drop(db);
        let n: i64 = Connection::open(dir.db())
            .unwrap()
            .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
