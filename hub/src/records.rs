//! The task record store: ipyparallel's `DictDB` (and `NoDB`) in memory, with
//! its Mongo-style query language.
//!
//! A record is the hub's memory of one request: the request itself, where it
//! went, its result and everything the engine published about it on iopub.
//! Clients read it back through `get_results`, `db_query`, `resubmit` and
//! `history`, and drop it through `purge_results`.
//!
//! No I/O and no clock here: dates are the ISO-8601 strings the wire carries,
//! stored as given, and compared as instants when a query needs it.
//!
//! Where this deliberately differs from `ipyparallel/controller/dictdb.py`:
//!
//! * `$gt` is a real "greater than" (DictDB's lambda is `b > a`, i.e. `$lt`).
//! * `$all` has MongoDB's meaning (the record's array contains every listed
//!   value; a scalar counts as a one-element array; an empty list matches
//!   nothing). DictDB's `all(a in bb for bb in b)` asks the opposite question
//!   and raises `TypeError` for array-valued records.
//! * Comparisons between mismatched types (`None < date`, `3 < "x"`, a date
//!   against a non-date string) are "no match" where Python raises
//!   `TypeError` and fails the whole query.
//! * Operator arguments are checked before any record is looked at, so a bad
//!   query fails even on an empty store; a top-level `$or`/`$and`/… is a
//!   [`DbError::BadQuery`] (DictDB would look for a record key named `$or`).
//! * A date without an offset is read as UTC (Python assumes the hub's local
//!   zone; a sans-IO core has none). Clients always send an offset.
//! * Culling is by insertion order, not by sorting on `submitted` (the same
//!   order unless client clocks disagree), and a count cull removes at least
//!   one record even when `cull_fraction * record_limit < 1`.
//! * [`RecordStore::size_bytes`] counts buffers (all DictDB counts) plus an
//!   estimate of the JSON fields, so a task printing megabytes of stdout is
//!   bounded too. `size_limit` therefore applies to both.
//! * Culled ids are not remembered: DictDB keeps an ever-growing set only to
//!   say "has been culled" instead of "no such msg_id".

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde_json::{Map, Number, Value};

/// Every key of an ipyparallel task record, in `empty_record()` order.
/// `buffers` and `result_buffers` live outside [`TaskRecord::fields`].
pub const RECORD_KEYS: [&str; 23] = [
    "msg_id",
    "header",
    "metadata",
    "content",
    "buffers",
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
    "result_buffers",
    "queue",
    "execute_input",
    "execute_result",
    "error",
    "stdout",
    "stderr",
    "label",
];

pub(crate) const BUFFER_KEYS: [&str; 2] = ["buffers", "result_buffers"];

const NODB_MESSAGE: &str = "NoDB backend doesn't store any data. Start the Controller with a \
                            DB backend to enable resubmission / result persistence.";

static NULL: Value = Value::Null;

/// One task record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskRecord {
    /// Every key except `buffers`/`result_buffers` (and those of
    /// `result_raw`); always includes `msg_id` once stored (the store keeps
    /// it equal to the key it is stored under).
    pub fields: Map<String, Value>,
    pub buffers: Vec<Bytes>,
    pub result_buffers: Vec<Bytes>,
    /// `result_header`, `result_metadata` and `result_content` as the JSON
    /// the engine sent, decoded when first read (DictDB's broadcast replies:
    /// [`RecordStore::update_record_raw`]). When set, `fields` has none of
    /// those three keys.
    pub result_raw: Option<Box<RawResult>>,
}

/// The keys a [`RawResult`] holds, in its order.
pub const RAW_RESULT_KEYS: [&str; 3] = ["result_header", "result_metadata", "result_content"];

impl TaskRecord {
    /// The value of `key`, `null` when absent (how DictDB's queries see it).
    pub fn get(&self, key: &str) -> &Value {
        self.field(key).unwrap_or(&NULL)
    }

    /// The value of `key` when the record has it.
    pub fn field(&self, key: &str) -> Option<&Value> {
        if let Some(v) = self.fields.get(key) {
            return Some(v);
        }
        let raw = self.result_raw.as_ref()?;
        let i = RAW_RESULT_KEYS.iter().position(|k| *k == key)?;
        Some(&raw.values()[i])
    }

    /// `fields` with the raw result's keys decoded in.
    pub fn all_fields(&self) -> Cow<'_, Map<String, Value>> {
        match &self.result_raw {
            None => Cow::Borrowed(&self.fields),
            Some(raw) => {
                let mut fields = self.fields.clone();
                for (k, v) in RAW_RESULT_KEYS.iter().zip(raw.values()) {
                    fields.insert((*k).to_owned(), v.clone());
                }
                Cow::Owned(fields)
            }
        }
    }

    /// Moves the raw result's keys into `fields`.
    pub fn settle(&mut self) {
        if let Some(raw) = self.result_raw.take() {
            for (k, v) in RAW_RESULT_KEYS.iter().zip((*raw).into_values()) {
                self.fields.insert((*k).to_owned(), v);
            }
        }
    }

    /// The record as every reader outside the store sees it: settled.
    pub fn settled(&self) -> Cow<'_, TaskRecord> {
        if self.result_raw.is_none() {
            return Cow::Borrowed(self);
        }
        let mut rec = self.clone();
        rec.settle();
        Cow::Owned(rec)
    }
}

/// A reply's header, metadata and content frames, kept as the JSON they
/// came as (in one buffer of their own) and decoded once, when first read.
/// The frames were checked to be JSON when the reply arrived (a frame that
/// somehow is not decodes as `null`).
#[derive(Debug, Clone)]
pub struct RawResult {
    buf: Bytes,
    /// Where the metadata and the content start in `buf`.
    split: [usize; 2],
    decoded: std::sync::OnceLock<[Value; 3]>,
}

impl PartialEq for RawResult {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl RawResult {
    pub fn new(header: &[u8], metadata: &[u8], content: &[u8]) -> RawResult {
        let mut buf = Vec::with_capacity(header.len() + metadata.len() + content.len());
        buf.extend_from_slice(header);
        buf.extend_from_slice(metadata);
        buf.extend_from_slice(content);
        RawResult {
            buf: Bytes::from(buf),
            split: [header.len(), header.len() + metadata.len()],
            decoded: std::sync::OnceLock::new(),
        }
    }

    fn frames(&self) -> [&[u8]; 3] {
        let [m, c] = self.split;
        [&self.buf[..m], &self.buf[m..c], &self.buf[c..]]
    }

    /// The header, metadata and content as JSON values.
    pub fn values(&self) -> &[Value; 3] {
        self.decoded.get_or_init(|| {
            self.frames()
                .map(|f| serde_json::from_slice(f).unwrap_or(Value::Null))
        })
    }

    pub fn into_values(self) -> [Value; 3] {
        let _ = self.values();
        self.decoded.into_inner().expect("decoded above")
    }

    /// What the three keys add to a record's size: the JSON text itself,
    /// as [`field_size`] counts a value's.
    fn size(&self) -> usize {
        RAW_RESULT_KEYS.iter().map(|k| k.len() + 3).sum::<usize>() + self.buf.len()
    }
}

/// DictDB's configurable limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbLimits {
    /// Most records kept; over it, the oldest `cull_fraction` are dropped.
    pub record_limit: usize,
    /// Most bytes kept (see [`RecordStore::size_bytes`]); over it, the oldest
    /// records are dropped until the size is `size_limit * (1 - cull_fraction)`.
    pub size_limit: usize,
    pub cull_fraction: f64,
}

impl Default for DbLimits {
    fn default() -> Self {
        DbLimits {
            record_limit: 1024,
            size_limit: 1024 * 1024 * 1024,
            cull_fraction: 0.1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DbBackend {
    /// ipyparallel's `DictDB`.
    Dict(DbLimits),
    /// ipyparallel's `NoDB`: writes are accepted and forgotten, reads fail
    /// with [`DbError::NoData`].
    None,
}

impl Default for DbBackend {
    fn default() -> Self {
        DbBackend::Dict(DbLimits::default())
    }
}

/// A record as returned by [`RecordStore::find_records`], possibly projected.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundRecord {
    pub fields: Map<String, Value>,
    /// `Some` when `buffers` was asked for (or no projection was given).
    pub buffers: Option<Vec<Bytes>>,
    /// `Some` when `result_buffers` was asked for (or no projection was given).
    pub result_buffers: Option<Vec<Bytes>>,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum DbError {
    /// The `NoDB` backend was asked for data.
    #[error("{0}")]
    NoData(String),
    /// No such record, a duplicate `msg_id`, or a projected key that a record lacks.
    #[error("{0}")]
    KeyError(String),
    /// The query is malformed or uses an unsupported operator.
    #[error("{0}")]
    BadQuery(String),
    /// The store on disk failed (I/O error, a full disk, its writer gone).
    #[error("{0}")]
    Storage(String),
}

impl DbError {
    /// The Python exception name to put in a `hub_error`-style error reply.
    pub fn ename(&self) -> &'static str {
        match self {
            DbError::NoData(_) => "NoData",
            DbError::KeyError(_) => "KeyError",
            DbError::BadQuery(_) => "ValueError",
            DbError::Storage(_) => "DatabaseError",
        }
    }

    pub(crate) fn no_such(msg_id: &str) -> Self {
        DbError::KeyError(format!("No such msg_id '{msg_id}'"))
    }

    fn no_data() -> Self {
        DbError::NoData(NODB_MESSAGE.to_owned())
    }
}

/// What the hub core asks of a task database. The in-memory
/// [`RecordStore`] (DictDB / NoDB) and the SQLite store
/// (`crate::sqlite_db::SqliteDb`) implement it; the core holds a
/// `Box<dyn TaskDb>` and never knows which, so it stays free of I/O (a store
/// that does I/O does it behind this trait, off the core's hot path where
/// it can).
///
/// Writes never fail the request that caused them: a record that cannot be
/// stored is logged by the core and the request proceeds (ipyparallel's
/// hub does the same).
pub trait TaskDb: Send + std::fmt::Debug {
    /// Stores the record of a request as it arrives. If a record already
    /// exists under `msg_id` (a repeated msg_id), the two are merged as
    /// hub.py's `save_queue_request` does: the new record's values win,
    /// except that an empty one (`null`, `""`) keeps the existing value; the
    /// request buffers are the new ones.
    fn add_request(&mut self, msg_id: &str, rec: TaskRecord) -> Result<(), DbError>;

    /// Shallow-merges `fields` into an existing record and, if given,
    /// replaces its `result_buffers` (`KeyError` when there is no record).
    fn update_record(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError>;

    /// [`Self::update_record`] with a reply's header, metadata and content
    /// still as JSON frames (`result_header`, `result_metadata`,
    /// `result_content`). A store may keep them so and decode them when the
    /// record is read; this one decodes them now.
    fn update_record_raw(
        &mut self,
        msg_id: &str,
        mut fields: Map<String, Value>,
        raw: RawResult,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        for (k, v) in RAW_RESULT_KEYS.iter().zip(raw.into_values()) {
            fields.insert((*k).to_owned(), v);
        }
        self.update_record(msg_id, fields, result_buffers)
    }

    /// Appends iopub `stream` text to an existing record's `stdout` or
    /// `stderr`. Output for a record the store does not hold (culled,
    /// purged, or never ours) is dropped: recreating it would let records
    /// escape the limits.
    fn append_output(&mut self, msg_id: &str, name: &str, text: &str);

    /// One record, current as of every write made before this call.
    fn get_record(&self, msg_id: &str) -> Result<Cow<'_, TaskRecord>, DbError>;

    /// Records matching `query`, oldest first, projected onto `keys` (see
    /// [`RecordStore::find_records`]).
    fn find_records(
        &self,
        query: &Value,
        keys: Option<&[String]>,
    ) -> Result<Vec<FoundRecord>, DbError>;

    /// Removes every record matching `query` and returns how many.
    fn drop_matching_records(&mut self, query: &Value) -> Result<usize, DbError>;

    /// Every `msg_id` with a `submitted` date, ordered by it.
    fn get_history(&self) -> Result<Vec<String>, DbError>;

    /// Records held in memory (all of them for DictDB; the cache of recent
    /// ones for a store on disk).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the records held in memory, as [`RecordStore::size_bytes`]
    /// counts them (for a store on disk, its cache's; O(cache) there, so
    /// for tests and diagnostics).
    fn size_bytes(&self) -> usize;
}

/// hub.py's merge of a request's record into one that already exists
/// (iopub output that arrived first, or a repeated msg_id): `new` wins
/// except where it is empty (`null` or `""`) and `existing` is not.
pub(crate) fn merge_request(existing: &Map<String, Value>, new: &mut Map<String, Value>) {
    let empty = |v: &Value| v.is_null() || v.as_str() == Some("");
    for (k, v) in existing {
        if !empty(v) && new.get(k).is_none_or(empty) {
            new.insert(k.clone(), v.clone());
        }
    }
}

/// DictDB's `get_history` order over `(submitted, msg_id)` pairs given in
/// insertion order: by the date (ties and unparsable dates by insertion
/// order), records without a date left out.
pub(crate) fn history_order<'a>(
    entries: impl Iterator<Item = (&'a Value, &'a str)>,
) -> Vec<String> {
    // Dates are parsed once here rather than in every comparison.
    let mut keyed: Vec<(Option<DateTime<Utc>>, &Value, &str)> = entries
        .filter(|(s, _)| !s.is_null())
        .map(|(s, id)| (s.as_str().and_then(parse_date), s, id))
        .collect();
    keyed.sort_by(|(da, va, _), (db, vb, _)| match (da, db) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => py_cmp(va, vb).unwrap_or(Ordering::Equal),
    });
    keyed.into_iter().map(|(_, _, id)| id.to_owned()).collect()
}

impl TaskDb for RecordStore {
    fn add_request(&mut self, msg_id: &str, mut rec: TaskRecord) -> Result<(), DbError> {
        match self.get_record(msg_id) {
            Ok(existing) => {
                merge_request(&existing.all_fields(), &mut rec.fields);
                RecordStore::update_record(self, msg_id, rec.fields, None)?;
                self.set_buffers(msg_id, rec.buffers)
            }
            Err(_) => self.add_record(msg_id, rec),
        }
    }

    fn update_record(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        RecordStore::update_record(self, msg_id, fields, result_buffers)
    }

    fn update_record_raw(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        raw: RawResult,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        RecordStore::update_record_raw(self, msg_id, fields, raw, result_buffers)
    }

    fn append_output(&mut self, msg_id: &str, name: &str, text: &str) {
        if self.contains(msg_id) {
            // Cannot fail: the record exists.
            let _ = self.append_stream(msg_id, name, text);
        }
    }

    fn get_record(&self, msg_id: &str) -> Result<Cow<'_, TaskRecord>, DbError> {
        RecordStore::get_record(self, msg_id).map(TaskRecord::settled)
    }

    fn find_records(
        &self,
        query: &Value,
        keys: Option<&[String]>,
    ) -> Result<Vec<FoundRecord>, DbError> {
        RecordStore::find_records(self, query, keys)
    }

    fn drop_matching_records(&mut self, query: &Value) -> Result<usize, DbError> {
        RecordStore::drop_matching_records(self, query)
    }

    fn get_history(&self) -> Result<Vec<String>, DbError> {
        RecordStore::get_history(self)
    }

    fn len(&self) -> usize {
        RecordStore::len(self)
    }

    fn size_bytes(&self) -> usize {
        RecordStore::size_bytes(self)
    }
}

/// The hub's task record store.
#[derive(Debug)]
pub struct RecordStore {
    /// `None` is the `NoDB` backend.
    dict: Option<DictDb>,
}

impl RecordStore {
    pub fn new(backend: DbBackend) -> Self {
        let dict = match backend {
            DbBackend::Dict(limits) => Some(DictDb::new(limits)),
            DbBackend::None => None,
        };
        RecordStore { dict }
    }

    /// A record with every key present: `stdout`/`stderr` are `""`, the rest
    /// `null` (buffers empty), like hub.py's `empty_record()`.
    pub fn empty_record(msg_id: &str) -> TaskRecord {
        let mut fields = Map::new();
        for key in RECORD_KEYS {
            if BUFFER_KEYS.contains(&key) {
                continue;
            }
            let value = match key {
                "msg_id" => Value::String(msg_id.to_owned()),
                "stdout" | "stderr" => Value::String(String::new()),
                _ => Value::Null,
            };
            fields.insert(key.to_owned(), value);
        }
        TaskRecord {
            fields,
            ..TaskRecord::default()
        }
    }

    /// Stores a new record under `msg_id` (which also becomes its `msg_id`
    /// field). A `buffers`/`result_buffers` key in `rec.fields` is discarded.
    /// May cull older records.
    pub fn add_record(&mut self, msg_id: &str, rec: TaskRecord) -> Result<(), DbError> {
        match &mut self.dict {
            Some(db) => db.add(msg_id, rec),
            None => Ok(()),
        }
    }

    pub fn get_record(&self, msg_id: &str) -> Result<&TaskRecord, DbError> {
        let db = self.dict.as_ref().ok_or_else(DbError::no_data)?;
        db.records
            .get(msg_id)
            .map(|e| &e.rec)
            .ok_or_else(|| DbError::no_such(msg_id))
    }

    pub fn contains(&self, msg_id: &str) -> bool {
        self.dict
            .as_ref()
            .is_some_and(|db| db.records.contains_key(msg_id))
    }

    /// Shallow-merges `fields` into the record (`dict.update`) and, if given,
    /// replaces its `result_buffers`. `msg_id`, `buffers` and `result_buffers`
    /// keys in `fields` are ignored. May cull (the size can grow).
    pub fn update_record(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        match &mut self.dict {
            Some(db) => db.update(msg_id, fields, None, result_buffers),
            None => Ok(()),
        }
    }

    /// [`Self::update_record`], with the reply's header, metadata and
    /// content kept as JSON until the record is read (a broadcast's records
    /// are mostly culled unread).
    pub fn update_record_raw(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        raw: RawResult,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        match &mut self.dict {
            Some(db) => db.update_raw(msg_id, fields, raw, result_buffers),
            None => Ok(()),
        }
    }

    /// Replaces the request `buffers` of an existing record: needed when the
    /// request arrives after iopub output already created the record (hub.py
    /// merges `init_record(msg)`, buffers included, with `update_record`).
    pub fn set_buffers(&mut self, msg_id: &str, buffers: Vec<Bytes>) -> Result<(), DbError> {
        match &mut self.dict {
            Some(db) => db.update(msg_id, Map::new(), Some(buffers), None),
            None => Ok(()),
        }
    }

    /// Appends iopub `stream` text to the record's `name` field (`stdout` or
    /// `stderr`) in place, creating the record from [`Self::empty_record`]
    /// when it does not exist, as hub.py's `save_iopub_message` does.
    pub fn append_stream(&mut self, msg_id: &str, name: &str, text: &str) -> Result<(), DbError> {
        match &mut self.dict {
            Some(db) => db.append_stream(msg_id, name, text),
            None => Ok(()),
        }
    }

    /// Removes a record if present (DictDB raises `KeyError` when it is not;
    /// nothing in hub.py relies on that).
    pub fn drop_record(&mut self, msg_id: &str) {
        if let Some(db) = &mut self.dict {
            db.remove(msg_id);
            db.compact_order();
        }
    }

    /// Removes every record matching `query`, pending or not, and returns how
    /// many. hub.py protects pending tasks itself (`completed: {$ne: null}`
    /// for "all", a pending check before `msg_id: {$in: …}`).
    pub fn drop_matching_records(&mut self, query: &Value) -> Result<usize, DbError> {
        let query = Query::parse(query)?;
        let Some(db) = &mut self.dict else {
            return Ok(0);
        };
        let ids: Vec<String> = db
            .matching(&query)
            .into_iter()
            .map(|e| e.msg_id().to_owned())
            .collect();
        for id in &ids {
            db.remove(id);
        }
        db.compact_order();
        Ok(ids.len())
    }

    /// Records matching `query`, oldest first. With `keys`, each record is
    /// projected onto those keys plus `msg_id`; an empty `keys` means no
    /// projection (DictDB's `if keys:`). A key that is neither a standard
    /// record key nor present in a matching record is a `KeyError`, like
    /// DictDB's `rec[key]`.
    pub fn find_records(
        &self,
        query: &Value,
        keys: Option<&[String]>,
    ) -> Result<Vec<FoundRecord>, DbError> {
        let query = Query::parse(query)?;
        let db = self.dict.as_ref().ok_or_else(DbError::no_data)?;
        let keys = keys.filter(|k| !k.is_empty());
        db.matching(&query)
            .into_iter()
            .map(|e| project(&e.rec, keys))
            .collect()
    }

    /// Every `msg_id` with a `submitted` date, ordered by it (ties and
    /// unparsable dates by insertion order), like `DictDB.get_history`.
    pub fn get_history(&self) -> Result<Vec<String>, DbError> {
        let db = self.dict.as_ref().ok_or_else(DbError::no_data)?;
        Ok(history_order(
            db.live_in_order()
                .map(|e| (e.rec.get("submitted"), e.msg_id())),
        ))
    }

    pub fn len(&self) -> usize {
        self.dict.as_ref().map_or(0, |db| db.records.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buffer bytes plus an estimate of the fields' JSON size, over all
    /// records; what `size_limit` bounds.
    pub fn size_bytes(&self) -> usize {
        self.dict.as_ref().map_or(0, |db| db.total_size)
    }
}

// ---------------------------------------------------------------------------
// DictDB
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Entry {
    /// Insertion sequence number; tells a live `order` slot from a stale one
    /// when a msg_id is dropped and added again.
    seq: u64,
    /// This record's share of `DictDb::total_size`.
    size: usize,
    rec: TaskRecord,
}

impl Entry {
    fn msg_id(&self) -> &str {
        self.rec.get("msg_id").as_str().unwrap_or_default()
    }
}

#[derive(Debug)]
struct DictDb {
    limits: DbLimits,
    records: HashMap<String, Entry>,
    /// Insertion order, oldest first. Dropping a record leaves its slot here
    /// (finding it would be O(n)); culling pops stale slots off the front and
    /// `compact_order` sweeps the rest once they outnumber the live ones, so
    /// this stays O(records) in size and O(1) amortised per operation.
    order: VecDeque<(u64, String)>,
    next_seq: u64,
    total_size: usize,
}

impl DictDb {
    fn new(limits: DbLimits) -> Self {
        DictDb {
            limits,
            records: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            total_size: 0,
        }
    }

    fn add(&mut self, msg_id: &str, mut rec: TaskRecord) -> Result<(), DbError> {
        if self.records.contains_key(msg_id) {
            return Err(DbError::KeyError(format!("Already have msg_id '{msg_id}'")));
        }
        for key in BUFFER_KEYS {
            rec.fields.remove(key);
        }
        rec.fields
            .insert("msg_id".to_owned(), Value::String(msg_id.to_owned()));
        let size = record_size(&rec);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.records
            .insert(msg_id.to_owned(), Entry { seq, size, rec });
        self.order.push_back((seq, msg_id.to_owned()));
        self.total_size += size;
        self.maybe_cull();
        Ok(())
    }

    fn update(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        buffers: Option<Vec<Bytes>>,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        let entry = self
            .records
            .get_mut(msg_id)
            .ok_or_else(|| DbError::no_such(msg_id))?;
        let before = entry.size;
        if entry.rec.result_raw.is_some() && RAW_RESULT_KEYS.iter().any(|k| fields.contains_key(*k))
        {
            // new values for the raw keys: the old ones become plain fields
            // first, so each key has one place and the size stays exact
            entry.rec.settle();
            entry.size = record_size(&entry.rec);
        }
        for (key, value) in fields {
            if key == "msg_id" || BUFFER_KEYS.contains(&key.as_str()) {
                continue;
            }
            // Add before subtracting: `size` is unsigned.
            let key_len = key.len();
            entry.size += field_size(&key, &value);
            if let Some(old) = entry.rec.fields.insert(key, value) {
                entry.size -= key_len + 3 + value_size(&old);
            }
        }
        if let Some(buffers) = buffers {
            entry.size += buffers_size(&buffers);
            entry.size -= buffers_size(&entry.rec.buffers);
            entry.rec.buffers = buffers;
        }
        if let Some(result_buffers) = result_buffers {
            entry.size += buffers_size(&result_buffers);
            entry.size -= buffers_size(&entry.rec.result_buffers);
            entry.rec.result_buffers = result_buffers;
        }
        self.total_size = self.total_size - before + entry.size;
        self.maybe_cull();
        Ok(())
    }

    /// [`Self::update`] for `fields`, then the raw result in place of any
    /// `result_header`/`result_metadata`/`result_content` the record had.
    fn update_raw(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        raw: RawResult,
        result_buffers: Option<Vec<Bytes>>,
    ) -> Result<(), DbError> {
        let entry = self
            .records
            .get_mut(msg_id)
            .ok_or_else(|| DbError::no_such(msg_id))?;
        let before = entry.size;
        for key in RAW_RESULT_KEYS {
            if let Some(old) = entry.rec.fields.remove(key) {
                entry.size -= field_size(key, &old);
            }
        }
        if let Some(old) = entry.rec.result_raw.replace(Box::new(raw)) {
            entry.size -= old.size();
        }
        entry.size += entry.rec.result_raw.as_ref().map_or(0, |raw| raw.size());
        self.total_size = self.total_size - before + entry.size;
        // the rest (and the cull) as any update
        self.update(msg_id, fields, None, result_buffers)
    }

    fn append_stream(&mut self, msg_id: &str, name: &str, text: &str) -> Result<(), DbError> {
        let Some(entry) = self.records.get_mut(msg_id) else {
            let mut rec = RecordStore::empty_record(msg_id);
            rec.fields
                .insert(name.to_owned(), Value::String(text.to_owned()));
            return self.add(msg_id, rec);
        };
        let before = entry.size;
        match entry.rec.fields.get_mut(name) {
            Some(Value::String(s)) => {
                s.push_str(text);
                entry.size += text.len();
            }
            // Missing or not a string (hub.py would raise on `None + str`):
            // start the stream afresh.
            _ => {
                let value = Value::String(text.to_owned());
                entry.size += field_size(name, &value);
                if let Some(old) = entry.rec.fields.insert(name.to_owned(), value) {
                    entry.size -= field_size(name, &old);
                }
            }
        }
        self.total_size = self.total_size - before + entry.size;
        self.maybe_cull();
        Ok(())
    }

    fn remove(&mut self, msg_id: &str) -> Option<Entry> {
        let entry = self.records.remove(msg_id)?;
        self.total_size -= entry.size;
        Some(entry)
    }

    fn is_live(&self, seq: u64, msg_id: &str) -> bool {
        self.records.get(msg_id).is_some_and(|e| e.seq == seq)
    }

    fn live_in_order(&self) -> impl Iterator<Item = &Entry> {
        self.order
            .iter()
            .filter_map(|(seq, id)| self.records.get(id).filter(|e| e.seq == *seq))
    }

    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.order
                .retain(|(seq, id)| records.get(id).is_some_and(|e| e.seq == *seq));
        }
    }

    /// DictDB's `_maybe_cull`: by count, then by size.
    fn maybe_cull(&mut self) {
        let DbLimits {
            record_limit,
            size_limit,
            cull_fraction,
        } = self.limits;
        if self.records.len() > record_limit {
            // `as` saturates: NaN/negative give 0, hence the floor of one.
            let n = ((cull_fraction * record_limit as f64) as usize).max(1);
            self.cull_oldest(|culled, _| culled < n);
        }
        if self.total_size > size_limit {
            let target = (size_limit as f64 * (1.0 - cull_fraction)) as usize;
            self.cull_oldest(|_, size| size > target);
        }
        self.compact_order();
    }

    /// Drops the oldest records while `more(culled_so_far, total_size)`.
    ///
    /// Only records with a `submitted` date are eligible: DictDB culls from
    /// `get_history()`, which leaves the others out. Such records (iopub
    /// output that arrived before its request, or whose request never came)
    /// are skipped and keep their place. DictDB's size cull loops forever when
    /// only ineligible records are left; this stops instead.
    fn cull_oldest(&mut self, mut more: impl FnMut(usize, usize) -> bool) {
        let mut skipped = Vec::new();
        let mut culled = 0;
        while more(culled, self.total_size) {
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if !self.is_live(seq, &id) {
                continue; // stale slot of a dropped record
            }
            if self.records[&id].rec.get("submitted").is_null() {
                skipped.push((seq, id));
            } else {
                self.remove(&id);
                culled += 1;
            }
        }
        for slot in skipped.into_iter().rev() {
            self.order.push_front(slot);
        }
    }

    /// Matching records in insertion order.
    fn matching<'a>(&'a self, query: &Query<'_>) -> Vec<&'a Entry> {
        match query.msg_id_candidates() {
            // hub.py's own queries (`get_results`, `resubmit`, `purge`) name
            // their msg_ids: look them up instead of scanning.
            Some(ids) => {
                let mut found: Vec<&Entry> =
                    ids.iter().filter_map(|id| self.records.get(*id)).collect();
                found.sort_by_key(|e| e.seq);
                found.dedup_by_key(|e| e.seq);
                found.retain(|e| query.matches(&e.rec));
                found
            }
            None => self
                .live_in_order()
                .filter(|e| query.matches(&e.rec))
                .collect(),
        }
    }
}

pub(crate) fn project(rec: &TaskRecord, keys: Option<&[String]>) -> Result<FoundRecord, DbError> {
    let Some(keys) = keys else {
        // Every key, as DictDB's records have them all: a record stored
        // without some (a broadcast engine's copy) reads them as null.
        let mut fields = rec.all_fields().into_owned();
        for key in RECORD_KEYS {
            if !BUFFER_KEYS.contains(&key) && !fields.contains_key(key) {
                fields.insert(key.to_owned(), Value::Null);
            }
        }
        return Ok(FoundRecord {
            fields,
            buffers: Some(rec.buffers.clone()),
            result_buffers: Some(rec.result_buffers.clone()),
        });
    };
    let mut found = FoundRecord {
        fields: Map::new(),
        buffers: None,
        result_buffers: None,
    };
    found
        .fields
        .insert("msg_id".to_owned(), rec.get("msg_id").clone());
    for key in keys {
        match key.as_str() {
            "buffers" => found.buffers = Some(rec.buffers.clone()),
            "result_buffers" => found.result_buffers = Some(rec.result_buffers.clone()),
            k => {
                let value = match rec.field(k) {
                    Some(v) => v.clone(),
                    None if RECORD_KEYS.contains(&k) => Value::Null,
                    None => return Err(DbError::KeyError(format!("No such record key '{k}'"))),
                };
                found.fields.insert(k.to_owned(), value);
            }
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// Size estimate
// ---------------------------------------------------------------------------

fn buffers_size(buffers: &[Bytes]) -> usize {
    buffers.iter().map(Bytes::len).sum()
}

/// Roughly the key's and value's JSON length; cheap and, above all,
/// deterministic, so that adding and removing a field cancel exactly.
fn field_size(key: &str, value: &Value) -> usize {
    key.len() + 3 + value_size(value)
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        Value::Object(map) => 2 + map.iter().map(|(k, v)| field_size(k, v) + 1).sum::<usize>(),
    }
}

pub(crate) fn record_size(rec: &TaskRecord) -> usize {
    rec.fields
        .iter()
        .map(|(k, v)| field_size(k, v))
        .sum::<usize>()
        + rec.result_raw.as_ref().map_or(0, |raw| raw.size())
        + buffers_size(&rec.buffers)
        + buffers_size(&rec.result_buffers)
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// A parsed query: every clause must hold (DictDB's `_match_one`).
#[derive(Debug)]
pub(crate) struct Query<'q> {
    clauses: Vec<(&'q str, Clause<'q>)>,
}

#[derive(Debug)]
enum Clause<'q> {
    /// `key: value`
    Equals(&'q Value),
    /// `key: {"$op": arg, …}`; an empty dict matches everything.
    Ops(Vec<Op<'q>>),
}

#[derive(Debug)]
enum Op<'q> {
    Lt(&'q Value),
    Gt(&'q Value),
    Lte(&'q Value),
    Gte(&'q Value),
    Eq(&'q Value),
    Ne(&'q Value),
    /// Argument is an array, string or object (Python's `in`).
    In(&'q Value),
    Nin(&'q Value),
    All(&'q [Value]),
    Mod {
        divisor: &'q Number,
        remainder: &'q Number,
    },
    Exists(bool),
    Glob(Glob),
}

impl<'q> Query<'q> {
    pub(crate) fn parse(query: &'q Value) -> Result<Self, DbError> {
        let Value::Object(map) = query else {
            return Err(DbError::BadQuery(format!(
                "query must be a dict, not {query}"
            )));
        };
        let mut clauses = Vec::with_capacity(map.len());
        for (key, value) in map {
            if key.starts_with('$') {
                return Err(DbError::BadQuery(format!(
                    "unsupported top-level query operator {key}"
                )));
            }
            let clause = match value {
                Value::Object(ops) => Clause::Ops(
                    ops.iter()
                        .map(|(op, arg)| Op::parse(key, op, arg))
                        .collect::<Result<_, _>>()?,
                ),
                other => Clause::Equals(other),
            };
            clauses.push((key.as_str(), clause));
        }
        Ok(Query { clauses })
    }

    pub(crate) fn matches(&self, rec: &TaskRecord) -> bool {
        self.clauses.iter().all(|(key, clause)| {
            let value = rec.get(key);
            match clause {
                Clause::Equals(expected) => py_eq(value, expected),
                Clause::Ops(ops) => ops.iter().all(|op| op.test(value)),
            }
        })
    }

    /// The only msg_ids that can match, when the query pins them with
    /// `msg_id: "…"` or `msg_id: {"$in": […]}`.
    pub(crate) fn msg_id_candidates(&self) -> Option<Vec<&'q str>> {
        let (_, clause) = self.clauses.iter().find(|(key, _)| *key == "msg_id")?;
        let values: &'q [Value] = match clause {
            Clause::Equals(v) => std::slice::from_ref(*v),
            Clause::Ops(ops) => ops.iter().find_map(|op| match op {
                Op::In(Value::Array(items)) => Some(items.as_slice()),
                _ => None,
            })?,
        };
        let mut ids = Vec::with_capacity(values.len());
        for value in values {
            match value {
                // A date-like id could equal a differently spelled one as an
                // instant; leave such oddities to the full scan.
                Value::String(s) if parse_date(s).is_none() => ids.push(s.as_str()),
                Value::String(_) => return None,
                _ => {} // msg_ids are strings: nothing else can match
            }
        }
        Some(ids)
    }
    /// The keys the query looks at.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &'q str> + '_ {
        self.clauses.iter().map(|(k, _)| *k)
    }

    /// Conditions every matching record meets, simple enough for a store on
    /// disk to test before it decodes a record (a superset filter: the
    /// record is still tested with [`Self::matches`]).
    pub(crate) fn prefilters(&self) -> Vec<(&'q str, Prefilter<'q>)> {
        let mut out = Vec::new();
        for (key, clause) in &self.clauses {
            let ops: &[Op<'q>] = match clause {
                Clause::Equals(v) => {
                    if let Some(p) = Prefilter::equal_to(v) {
                        out.push((*key, p));
                    }
                    continue;
                }
                Clause::Ops(ops) => ops,
            };
            for op in ops {
                let p = match op {
                    Op::Eq(v) => Prefilter::equal_to(v),
                    Op::Ne(Value::Null) | Op::Exists(true) => Some(Prefilter::NotNull),
                    Op::Exists(false) => Some(Prefilter::IsNull),
                    // Every ordering needs a non-null value on both sides.
                    Op::Lt(_) | Op::Gt(_) | Op::Lte(_) | Op::Gte(_) => Some(Prefilter::NotNull),
                    _ => None,
                };
                if let Some(p) = p {
                    out.push((*key, p));
                }
            }
        }
        out
    }
}

/// See [`Query::prefilters`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prefilter<'q> {
    IsNull,
    NotNull,
    /// The value is exactly this string (one that is not a date: a date
    /// also equals other spellings of its instant).
    IsString(&'q str),
}

impl<'q> Prefilter<'q> {
    fn equal_to(v: &'q Value) -> Option<Self> {
        match v {
            Value::Null => Some(Prefilter::IsNull),
            Value::String(s) if parse_date(s).is_none() => Some(Prefilter::IsString(s)),
            _ => None,
        }
    }
}

impl<'q> Op<'q> {
    fn parse(key: &str, op: &str, arg: &'q Value) -> Result<Self, DbError> {
        let bad = |why: &str| DbError::BadQuery(format!("{op} on {key:?}: {why}, got {arg}"));
        Ok(match op {
            "$lt" => Op::Lt(arg),
            "$gt" => Op::Gt(arg),
            "$lte" => Op::Lte(arg),
            "$gte" => Op::Gte(arg),
            "$eq" => Op::Eq(arg),
            "$ne" => Op::Ne(arg),
            "$in" | "$nin" => {
                if !matches!(arg, Value::Array(_) | Value::String(_) | Value::Object(_)) {
                    return Err(bad("argument must be a list"));
                }
                if op == "$in" {
                    Op::In(arg)
                } else {
                    Op::Nin(arg)
                }
            }
            "$all" => match arg {
                Value::Array(items) => Op::All(items),
                _ => return Err(bad("argument must be a list")),
            },
            "$mod" => match arg.as_array().map(Vec::as_slice) {
                Some([Value::Number(divisor), Value::Number(remainder)]) => {
                    if divisor.as_f64() == Some(0.0) {
                        return Err(bad("modulo by zero"));
                    }
                    Op::Mod { divisor, remainder }
                }
                _ => return Err(bad("argument must be [divisor, remainder]")),
            },
            "$exists" => Op::Exists(truthy(arg)),
            "$glob" => match arg {
                Value::String(pattern) => Op::Glob(Glob::new(pattern)),
                _ => return Err(bad("pattern must be a string")),
            },
            _ => {
                return Err(DbError::BadQuery(format!(
                    "unsupported query operator {op} on {key:?}"
                )));
            }
        })
    }

    /// Tests a record's value (`null` when the key is absent).
    fn test(&self, value: &Value) -> bool {
        match self {
            Op::Lt(arg) => py_cmp(value, arg) == Some(Ordering::Less),
            // DictDB has `lambda a, b: b > a` here, which is `$lt` again.
            Op::Gt(arg) => py_cmp(value, arg) == Some(Ordering::Greater),
            Op::Lte(arg) => matches!(py_cmp(value, arg), Some(Ordering::Less | Ordering::Equal)),
            Op::Gte(arg) => matches!(
                py_cmp(value, arg),
                Some(Ordering::Greater | Ordering::Equal)
            ),
            Op::Eq(arg) => py_eq(value, arg),
            Op::Ne(arg) => !py_eq(value, arg),
            Op::In(arg) => py_in(value, arg) == Some(true),
            Op::Nin(arg) => py_in(value, arg) == Some(false),
            Op::All(wanted) => {
                let have = match value {
                    Value::Array(items) => items.as_slice(),
                    scalar => std::slice::from_ref(scalar),
                };
                !wanted.is_empty() && wanted.iter().all(|w| have.iter().any(|h| py_eq(h, w)))
            }
            Op::Mod { divisor, remainder } => match value {
                Value::Number(n) => py_mod_eq(n, divisor, remainder),
                _ => false,
            },
            Op::Exists(wanted) => value.is_null() != *wanted,
            Op::Glob(glob) => value.as_str().is_some_and(|s| glob.matches(s)),
        }
    }
}

/// Python's truthiness of a JSON value.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn as_int(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

fn num_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// Python's `a % b == r` (the result takes the divisor's sign).
fn py_mod_eq(a: &Number, divisor: &Number, remainder: &Number) -> bool {
    if let (Some(x), Some(m)) = (as_int(a), as_int(divisor)) {
        if m == 0 {
            return false;
        }
        let mut r = x % m;
        if r != 0 && (r < 0) != (m < 0) {
            r += m;
        }
        return match as_int(remainder) {
            Some(want) => r == want,
            None => remainder.as_f64() == Some(r as f64),
        };
    }
    let (Some(x), Some(m), Some(want)) = (a.as_f64(), divisor.as_f64(), remainder.as_f64()) else {
        return false;
    };
    if m == 0.0 {
        return false;
    }
    let mut r = x % m;
    if r != 0.0 && (r < 0.0) != (m < 0.0) {
        r += m;
    }
    r == want
}

/// Equality as DictDB sees it after `extract_dates`: numbers by value, two
/// date strings as instants, containers element-wise.
fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => {
            x == y
                || match (parse_date(x), parse_date(y)) {
                    (Some(p), Some(q)) => p == q,
                    _ => false,
                }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => false,
    }
}

/// Ordering as Python's `<` would give it; `None` where Python raises
/// `TypeError` (which here means "no match").
fn py_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y),
        (Value::String(x), Value::String(y)) => match (parse_date(x), parse_date(y)) {
            (Some(p), Some(q)) => Some(p.cmp(&q)),
            (None, None) => Some(x.cmp(y)),
            // datetime vs str in Python
            _ => None,
        },
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                if !py_eq(p, q) {
                    return py_cmp(p, q);
                }
            }
            Some(x.len().cmp(&y.len()))
        }
        _ => None,
    }
}

/// Python's `a in b` for a list, str or dict `b`; `None` where it raises.
fn py_in(a: &Value, b: &Value) -> Option<bool> {
    match b {
        Value::Array(items) => Some(items.iter().any(|item| py_eq(a, item))),
        Value::String(haystack) => a.as_str().map(|needle| haystack.contains(needle)),
        Value::Object(map) => match a {
            Value::String(k) => Some(map.contains_key(k)),
            Value::Array(_) | Value::Object(_) => None, // unhashable
            _ => Some(false),
        },
        _ => None,
    }
}

/// Parses the ISO-8601 shape ipyparallel recognises as a date
/// (`YYYY-MM-DDTHH:MM:SS[.fff…][Z|±HH:MM|±HHMM]`) into an instant.
/// Up to nine fractional digits are accepted (Python's pattern stops at
/// six); a missing offset means UTC.
pub(crate) fn parse_date(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let digits = |from: usize, to: usize| -> Option<u32> {
        let part = b.get(from..to)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    };
    let year = i32::try_from(digits(0, 4)?).ok()?;
    let (month, day) = (digits(5, 7)?, digits(8, 10)?);
    let (hour, minute, second) = (digits(11, 13)?, digits(14, 16)?, digits(17, 19)?);

    let mut i = 19;
    let mut nanos = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(start, i)? * 10u32.pow(9 - n as u32);
    }

    let offset_secs: i64 = match &b[i..] {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (hh, mm) = match rest {
                [_, _, b':', _, _] => (digits(i + 1, i + 3)?, digits(i + 4, i + 6)?),
                [_, _, _, _] => (digits(i + 1, i + 3)?, digits(i + 3, i + 5)?),
                _ => return None,
            };
            if hh > 23 || mm > 59 {
                return None;
            }
            let secs = i64::from(hh * 3600 + mm * 60);
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };

    let naive =
        NaiveDate::from_ymd_opt(year, month, day)?.and_hms_nano_opt(hour, minute, second, nanos)?;
    Some(
        naive
            .checked_sub_signed(TimeDelta::seconds(offset_secs))?
            .and_utc(),
    )
}

// ---------------------------------------------------------------------------
// fnmatch
// ---------------------------------------------------------------------------

/// A compiled `fnmatch.fnmatch` pattern (POSIX: case-sensitive, `*` also
/// matches `/` and newlines, no backslash escapes).
#[derive(Debug)]
struct Glob {
    tokens: Vec<GlobToken>,
}

#[derive(Debug)]
enum GlobToken {
    Star,
    AnyChar,
    Literal(char),
    /// `[…]` / `[!…]`. Reversed ranges such as `z-a` match nothing, as in
    /// Python, so an emptied class never matches and a negated one matches
    /// any character.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    fn new(pattern: &str) -> Self {
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' => {
                    if !matches!(tokens.last(), Some(GlobToken::Star)) {
                        tokens.push(GlobToken::Star);
                    }
                }
                '?' => tokens.push(GlobToken::AnyChar),
                '[' => {
                    // As fnmatch.translate: a `]` right after `[` or `[!` is
                    // a member; without a closing `]` the `[` is literal.
                    let mut j = i;
                    if chars.get(j) == Some(&'!') {
                        j += 1;
                    }
                    if chars.get(j) == Some(&']') {
                        j += 1;
                    }
                    while j < chars.len() && chars[j] != ']' {
                        j += 1;
                    }
                    if j >= chars.len() {
                        tokens.push(GlobToken::Literal('['));
                        continue;
                    }
                    let mut body = &chars[i..j];
                    i = j + 1;
                    let negated = body.first() == Some(&'!');
                    if negated {
                        body = &body[1..];
                    }
                    let mut ranges = Vec::new();
                    let mut k = 0;
                    while k < body.len() {
                        if k + 2 < body.len() && body[k + 1] == '-' {
                            ranges.push((body[k], body[k + 2]));
                            k += 3;
                        } else {
                            ranges.push((body[k], body[k]));
                            k += 1;
                        }
                    }
                    tokens.push(GlobToken::Class { negated, ranges });
                }
                c => tokens.push(GlobToken::Literal(c)),
            }
        }
        Glob { tokens }
    }

    fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut p) = (0, 0);
        // Where to resume after the last `*`: (token after it, text position).
        let mut backtrack: Option<(usize, usize)> = None;
        loop {
            if p < self.tokens.len() {
                match &self.tokens[p] {
                    GlobToken::Star => {
                        backtrack = Some((p + 1, t));
                        p += 1;
                        continue;
                    }
                    token if t < text.len() && token.matches_char(text[t]) => {
                        p += 1;
                        t += 1;
                        continue;
                    }
                    _ => {}
                }
            } else if t == text.len() {
                return true;
            }
            // Mismatch: let the last `*` swallow one more character.
            match backtrack {
                Some((bp, bt)) if bt < text.len() => {
                    backtrack = Some((bp, bt + 1));
                    p = bp;
                    t = bt + 1;
                }
                _ => return false,
            }
        }
    }
}

impl GlobToken {
    fn matches_char(&self, c: char) -> bool {
        match self {
            GlobToken::Star | GlobToken::AnyChar => true,
            GlobToken::Literal(l) => *l == c,
            GlobToken::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> RecordStore {
        RecordStore::new(DbBackend::default())
    }

    fn limited(record_limit: usize, size_limit: usize, cull_fraction: f64) -> RecordStore {
        RecordStore::new(DbBackend::Dict(DbLimits {
            record_limit,
            size_limit,
            cull_fraction,
        }))
    }

    /// A record like `init_record` makes, plus `extra` fields.
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

    fn ids(found: &[FoundRecord]) -> Vec<&str> {
        found
            .iter()
            .map(|r| r.fields["msg_id"].as_str().unwrap())
            .collect()
    }

    fn find(db: &RecordStore, query: Value) -> Vec<String> {
        let found = db.find_records(&query, None).unwrap();
        ids(&found).into_iter().map(str::to_owned).collect()
    }

    fn bad(db: &RecordStore, query: Value) -> String {
        match db.find_records(&query, None) {
            Err(e @ DbError::BadQuery(_)) => {
                assert_eq!(e.ename(), "ValueError");
                e.to_string()
            }
            other => panic!("expected BadQuery for {query}, got {other:?}"),
        }
    }

    /// a..e with numbers, labels and dates; `e` has no `submitted`.
    fn sample() -> RecordStore {
        let mut db = store();
        let rows = [
            (
                "a",
                Some("2026-11-22T00:00:01.000000Z"),
                json!({"n": 1, "label": "group_a", "completed": "2026-11-22T00:00:05Z"}),
            ),
            (
                "b",
                Some("2026-11-22T00:00:02Z"),
                json!({"n": 2.5, "label": "group_a/sub_x", "completed": null}),
            ),
            (
                "c",
                Some("2026-11-22T02:00:03+02:00"),
                json!({"n": -7, "label": "group_b", "completed": "2026-11-22T00:00:09.5+00:00", "tags": ["x", "y"]}),
            ),
            (
                "d",
                Some("2026-11-22T00:00:04.123456+00:00"),
                json!({"n": "4", "label": "label*task", "completed": null, "tags": ["y"]}),
            ),
            ("e", None, json!({"label": null})),
        ];
        for (id, submitted, extra) in rows {
            db.add_record(id, task(id, submitted, extra)).unwrap();
        }
        db
    }

    #[test]
    fn empty_record_has_every_key() {
        let rec = RecordStore::empty_record("m1");
        for key in RECORD_KEYS {
            if BUFFER_KEYS.contains(&key) {
                assert!(!rec.fields.contains_key(key));
            } else {
                assert!(rec.fields.contains_key(key), "{key}");
            }
        }
        assert_eq!(rec.fields.len(), 21);
        assert_eq!(rec.get("msg_id"), &json!("m1"));
        assert_eq!(rec.get("stdout"), &json!(""));
        assert_eq!(rec.get("stderr"), &json!(""));
        assert_eq!(rec.get("completed"), &Value::Null);
        assert_eq!(rec.get("not-a-key"), &Value::Null);
        assert!(rec.buffers.is_empty() && rec.result_buffers.is_empty());
    }

    #[test]
    fn add_get_contains_and_duplicates() {
        let mut db = store();
        assert!(db.is_empty());
        db.add_record("m1", task("m1", Some("2026-01-01T00:00:00Z"), json!({})))
            .unwrap();
        assert!(db.contains("m1"));
        assert!(!db.contains("m2"));
        assert_eq!(db.len(), 1);
        assert_eq!(db.get_record("m1").unwrap().get("msg_id"), &json!("m1"));

        let err = db
            .add_record("m1", RecordStore::empty_record("m1"))
            .unwrap_err();
        assert_eq!(err.ename(), "KeyError");
        assert!(
            err.to_string().contains("Already have msg_id 'm1'"),
            "{err}"
        );

        let err = db.get_record("nope").unwrap_err();
        assert_eq!(err, DbError::KeyError("No such msg_id 'nope'".into()));
    }

    #[test]
    fn add_record_enforces_msg_id_and_strips_buffer_keys() {
        let mut db = store();
        let mut rec = TaskRecord::default();
        rec.fields.insert("buffers".into(), json!([1, 2]));
        db.add_record("m1", rec).unwrap();
        let rec = db.get_record("m1").unwrap();
        assert_eq!(rec.get("msg_id"), &json!("m1"));
        assert!(!rec.fields.contains_key("buffers"));
    }

    #[test]
    fn update_merges_shallowly_and_replaces_result_buffers() {
        let mut db = store();
        let mut rec = task(
            "m1",
            Some("2026-01-01T00:00:00Z"),
            json!({"header": {"a": 1, "b": 2}}),
        );
        rec.buffers = vec![Bytes::from_static(b"req")];
        db.add_record("m1", rec).unwrap();
        db.update_record(
            "m1",
            fields(json!({"header": {"a": 3}, "completed": "2026-01-01T00:00:01Z", "msg_id": "other", "result_buffers": [1]})),
            Some(vec![Bytes::from_static(b"res1"), Bytes::from_static(b"res2")]),
        )
        .unwrap();
        let rec = db.get_record("m1").unwrap();
        assert_eq!(
            rec.get("header"),
            &json!({"a": 3}),
            "dict.update is shallow"
        );
        assert_eq!(rec.get("completed"), &json!("2026-01-01T00:00:01Z"));
        assert_eq!(rec.get("msg_id"), &json!("m1"), "msg_id is not updatable");
        assert!(!rec.fields.contains_key("result_buffers"));
        assert_eq!(rec.buffers, vec![Bytes::from_static(b"req")]);
        assert_eq!(rec.result_buffers.len(), 2);

        // None leaves result buffers alone.
        db.update_record("m1", fields(json!({"queue": "task"})), None)
            .unwrap();
        assert_eq!(db.get_record("m1").unwrap().result_buffers.len(), 2);

        db.set_buffers("m1", vec![Bytes::from_static(b"new request")])
            .unwrap();
        assert_eq!(
            db.get_record("m1").unwrap().buffers,
            vec![Bytes::from_static(b"new request")]
        );
    }

    #[test]
    fn update_of_missing_record_is_key_error() {
        let mut db = store();
        let err = db
            .update_record("ghost", fields(json!({"completed": null})), None)
            .unwrap_err();
        assert_eq!(err.ename(), "KeyError");
        assert!(err.to_string().contains("ghost"));
        assert!(matches!(
            db.set_buffers("ghost", vec![]),
            Err(DbError::KeyError(_))
        ));
        assert!(db.is_empty());
    }

    #[test]
    fn append_stream_creates_then_concatenates() {
        let mut db = store();
        db.append_stream("m1", "stdout", "hello ").unwrap();
        let rec = db.get_record("m1").unwrap();
        assert_eq!(rec.get("stdout"), &json!("hello "));
        assert_eq!(rec.get("stderr"), &json!(""));
        assert_eq!(
            rec.get("submitted"),
            &Value::Null,
            "created like empty_record"
        );
        let size = db.size_bytes();

        db.append_stream("m1", "stdout", "world").unwrap();
        db.append_stream("m1", "stderr", "oops").unwrap();
        let rec = db.get_record("m1").unwrap();
        assert_eq!(rec.get("stdout"), &json!("hello world"));
        assert_eq!(rec.get("stderr"), &json!("oops"));
        assert_eq!(db.size_bytes(), size + "world".len() + "oops".len());

        // A null stream starts afresh rather than failing.
        db.update_record("m1", fields(json!({"stdout": null})), None)
            .unwrap();
        db.append_stream("m1", "stdout", "again").unwrap();
        assert_eq!(db.get_record("m1").unwrap().get("stdout"), &json!("again"));
        assert_eq!(db.len(), 1);
    }

    #[test]
    fn a_raw_result_reads_as_decoded_fields_everywhere() {
        let mut db = store();
        db.add_record("m1", task("m1", Some("2026-01-01T00:00:00Z"), json!({})))
            .unwrap();
        // the record had a result already: the raw one replaces it
        db.update_record(
            "m1",
            fields(json!({"result_content": {"status": "old"}})),
            None,
        )
        .unwrap();
        let raw = RawResult::new(
            br#"{"msg_id":"r1","msg_type":"execute_reply"}"#,
            br#"{"status":"ok","engine":"e1"}"#,
            br#"{"status":"ok","execution_count":3}"#,
        );
        let f = fields(json!({"completed": "2026-01-01T00:00:01Z", "engine_uuid": "e1"}));
        TaskDb::update_record_raw(
            &mut db,
            "m1",
            f,
            raw,
            Some(vec![Bytes::from_static(b"buf")]),
        )
        .unwrap();
        assert_eq!(db.size_bytes(), record_size(db.get_record("m1").unwrap()));

        // get_record (the trait's: what the core reads) is settled
        let rec = TaskDb::get_record(&db, "m1").unwrap();
        assert!(rec.result_raw.is_none());
        assert_eq!(
            rec.fields["result_content"],
            json!({"status": "ok", "execution_count": 3})
        );
        assert_eq!(
            rec.fields["result_header"]["msg_type"],
            json!("execute_reply")
        );
        assert_eq!(rec.fields["engine_uuid"], json!("e1"));
        assert_eq!(rec.result_buffers, vec![Bytes::from_static(b"buf")]);

        // queries match on the raw keys; projections and full records carry them
        let q = json!({"result_content": {"$ne": null}});
        assert_eq!(find(&db, q.clone()), ["m1"]);
        let keys = ["result_metadata".to_owned()];
        let found = db.find_records(&q, Some(&keys)).unwrap();
        assert_eq!(
            found[0].fields["result_metadata"],
            json!({"status": "ok", "engine": "e1"})
        );
        let all = db.find_records(&json!({"msg_id": "m1"}), None).unwrap();
        assert_eq!(all[0].fields["result_header"]["msg_id"], json!("r1"));

        // a later plain update of a raw key wins, and the size stays exact
        db.update_record(
            "m1",
            fields(json!({"result_content": {"status": "error"}})),
            None,
        )
        .unwrap();
        let rec = TaskDb::get_record(&db, "m1").unwrap();
        assert_eq!(rec.fields["result_content"], json!({"status": "error"}));
        assert_eq!(rec.fields["result_header"]["msg_id"], json!("r1"));
        assert_eq!(db.size_bytes(), record_size(db.get_record("m1").unwrap()));

        // a repeated request merges over the decoded result, not over null
        let again = task("m1", Some("2026-01-01T00:00:00Z"), json!({}));
        TaskDb::add_request(&mut db, "m1", again).unwrap();
        let rec = TaskDb::get_record(&db, "m1").unwrap();
        assert_eq!(rec.fields["result_header"]["msg_id"], json!("r1"));

        db.drop_record("m1");
        assert_eq!(db.size_bytes(), 0);
    }

    #[test]
    fn size_is_tracked_incrementally_and_returns_to_zero() {
        let mut db = store();
        let mut rec = task(
            "m1",
            Some("2026-01-01T00:00:00Z"),
            json!({"content": {"code": "x = 1"}}),
        );
        rec.buffers = vec![Bytes::from(vec![0u8; 1000])];
        db.add_record("m1", rec.clone()).unwrap();
        assert_eq!(db.size_bytes(), record_size(&rec));
        assert!(db.size_bytes() >= 1000);

        db.update_record(
            "m1",
            fields(json!({"result_content": {"status": "ok"}, "content": null})),
            Some(vec![Bytes::from(vec![0u8; 500])]),
        )
        .unwrap();
        db.append_stream("m1", "stdout", "some output").unwrap();
        db.set_buffers("m1", vec![]).unwrap();
        assert_eq!(db.size_bytes(), record_size(db.get_record("m1").unwrap()));

        db.append_stream("m2", "stderr", "x").unwrap();
        db.drop_record("m1");
        db.drop_record("m2");
        db.drop_record("never existed");
        assert_eq!(db.size_bytes(), 0);
        assert!(db.is_empty());
    }

    #[test]
    fn equality_and_absent_keys_are_null() {
        let db = sample();
        assert_eq!(find(&db, json!({})), ["a", "b", "c", "d", "e"]);
        assert_eq!(find(&db, json!({"label": "group_b"})), ["c"]);
        assert_eq!(
            find(&db, json!({"n": 1.0})),
            ["a"],
            "numbers compare by value"
        );
        assert_eq!(
            find(&db, json!({"n": 2.5, "label": "group_a/sub_x"})),
            ["b"]
        );
        assert_eq!(
            find(&db, json!({"n": 2.5, "label": "group_b"})),
            Vec::<String>::new()
        );
        assert_eq!(find(&db, json!({"tags": ["x", "y"]})), ["c"]);
        // `tags` is absent from a, b and e: null.
        assert_eq!(find(&db, json!({"tags": null})), ["a", "b", "e"]);
        assert_eq!(
            find(&db, json!({"no_such_key": null})),
            ["a", "b", "c", "d", "e"]
        );
        // ipyparallel's test_null.
        assert!(find(&db, json!({"msg_id": null})).is_empty());
        assert_eq!(find(&db, json!({"submitted": null})), ["e"]);
    }

    #[test]
    fn eq_and_ne() {
        let db = sample();
        assert_eq!(find(&db, json!({"n": {"$eq": 1}})), ["a"]);
        assert_eq!(find(&db, json!({"n": {"$ne": 1}})), ["b", "c", "d", "e"]);
        assert_eq!(
            find(&db, json!({"msg_id": {"$ne": ""}})),
            ["a", "b", "c", "d", "e"]
        );
        // "4" is a string, not the number 4.
        assert!(find(&db, json!({"n": {"$eq": 4}})).is_empty());
        assert_eq!(find(&db, json!({"label": {"$eq": null}})), ["e"]);
    }

    #[test]
    fn ne_null_on_completed_selects_finished_tasks() {
        let mut db = sample();
        assert_eq!(find(&db, json!({"completed": {"$ne": null}})), ["a", "c"]);
        assert_eq!(find(&db, json!({"completed": null})), ["b", "d", "e"]);
        // purge_results(msg_ids='all') leaves pending tasks alone.
        assert_eq!(
            db.drop_matching_records(&json!({"completed": {"$ne": null}}))
                .unwrap(),
            2
        );
        assert_eq!(find(&db, json!({})), ["b", "d", "e"]);
    }

    #[test]
    fn ordering_operators_on_numbers() {
        let db = sample();
        assert_eq!(find(&db, json!({"n": {"$lt": 2}})), ["a", "c"]);
        assert_eq!(find(&db, json!({"n": {"$lte": 2.5}})), ["a", "b", "c"]);
        assert_eq!(find(&db, json!({"n": {"$gte": 1}})), ["a", "b"]);
        // A real "greater than": DictDB's `$gt` would return a and c here.
        assert_eq!(find(&db, json!({"n": {"$gt": 1}})), ["b"]);
        assert_eq!(find(&db, json!({"n": {"$gt": -10, "$lt": 2}})), ["a", "c"]);
        assert_eq!(find(&db, json!({"n": {"$gt": 100}})), Vec::<String>::new());
        // Large integers compare exactly.
        let mut big = store();
        big.add_record("x", task("x", None, json!({"n": u64::MAX})))
            .unwrap();
        big.add_record("y", task("y", None, json!({"n": i64::MIN})))
            .unwrap();
        assert_eq!(find(&big, json!({"n": {"$gt": u64::MAX - 1}})), ["x"]);
        assert_eq!(find(&big, json!({"n": {"$lt": i64::MIN + 1}})), ["y"]);
    }

    #[test]
    fn ordering_operators_on_strings_and_mismatched_types() {
        let db = sample();
        assert_eq!(find(&db, json!({"label": {"$lt": "group_b"}})), ["a", "b"]);
        assert_eq!(find(&db, json!({"label": {"$gte": "group_b"}})), ["c", "d"]);
        // d's n is the string "4": never ordered against a number; null
        // (e's missing n) is never ordered at all. Python would raise.
        assert_eq!(find(&db, json!({"n": {"$gte": -100}})), ["a", "b", "c"]);
        assert!(find(&db, json!({"completed": {"$lt": null}})).is_empty());
        assert!(find(&db, json!({"label": {"$lt": 5}})).is_empty());
        assert!(find(&db, json!({"tags": {"$lt": {"a": 1}}})).is_empty());
        // Lists compare lexicographically, like Python's.
        assert_eq!(find(&db, json!({"tags": {"$lt": ["y", "a"]}})), ["c", "d"]);
        assert_eq!(find(&db, json!({"tags": {"$gt": ["x", "y"]}})), ["d"]);
    }

    #[test]
    fn dates_compare_as_instants_across_offsets_and_suffixes() {
        let db = sample();
        // c was submitted at 00:00:03Z written as +02:00.
        assert_eq!(
            find(&db, json!({"submitted": {"$gt": "2026-11-22T00:00:02.5Z"}})),
            ["c", "d"]
        );
        assert_eq!(
            find(
                &db,
                json!({"submitted": {"$lt": "2026-11-21T19:00:03-05:00"}})
            ),
            ["a", "b"]
        );
        assert_eq!(
            find(
                &db,
                json!({"submitted": {"$lte": "2026-11-22T00:00:03+00:00"}})
            ),
            ["a", "b", "c"]
        );
        assert_eq!(
            find(
                &db,
                json!({"submitted": {"$gte": "2026-11-22T01:00:03+0100"}})
            ),
            ["c", "d"]
        );
        // Same instant, different spelling.
        assert_eq!(
            find(&db, json!({"submitted": "2026-11-22T00:00:03Z"})),
            ["c"]
        );
        assert_eq!(
            find(
                &db,
                json!({"submitted": {"$eq": "2026-11-22T00:00:01+00:00"}})
            ),
            ["a"]
        );
        assert_eq!(
            find(
                &db,
                json!({"submitted": {"$eq": "2026-11-22T00:00:04.123456000Z"}})
            ),
            ["d"]
        );
        assert_eq!(
            find(
                &db,
                json!({"submitted": {"$ne": "2026-11-22T00:00:02.000+00:00"}})
            ),
            ["a", "c", "d", "e"]
        );
        // A naive date is read as UTC.
        assert_eq!(
            find(&db, json!({"submitted": "2026-11-22T00:00:02"})),
            ["b"]
        );
        // A range on completed (null never matches).
        assert_eq!(
            find(
                &db,
                json!({"completed": {"$gte": "2026-11-22T00:00:05Z", "$lt": "2026-11-22T00:00:09.6Z"}})
            ),
            ["a", "c"]
        );
        // Lexically, "…02:00:03+02:00" > "…00:00:04…": the instant order wins.
        assert_eq!(
            find(&db, json!({"submitted": {"$gt": "2026-11-22T00:00:03.5Z"}})),
            ["d"]
        );
        // A date against a non-date string is a type mismatch.
        assert!(find(&db, json!({"submitted": {"$lt": "zzz"}})).is_empty());
        assert!(find(&db, json!({"label": {"$lt": "2030-01-01T00:00:00Z"}})).is_empty());
    }

    #[test]
    fn parse_date_shapes() {
        let z = parse_date("2026-11-22T00:23:30.088000Z").unwrap();
        for same in [
            "2026-11-22T00:23:30.088Z",
            "2026-11-22T00:23:30.088+00:00",
            "2026-11-22T00:23:30.088-00:00",
            "2026-11-22T01:23:30.088+01:00",
            "2026-11-21T19:23:30.088-0500",
            "2026-11-22T00:23:30.088000000",
        ] {
            assert_eq!(parse_date(same), Some(z), "{same}");
        }
        for not_a_date in [
            "",
            "2026-11-22",
            "2026-11-22 00:23:30Z",
            "2026-11-22T00:23:30.Z",
            "2026-11-22T00:23:30.0880000001Z",
            "2026-11-22T00:23:30+0",
            "2026-11-22T00:23:30+24:00",
            "2026-13-22T00:23:30Z",
            "2026-02-30T00:23:30Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T00:23:30Zjunk",
            "x026-11-22T00:23:30Z",
            "2026-11-22T00:23:30\u{e9}",
        ] {
            assert_eq!(parse_date(not_a_date), None, "{not_a_date}");
        }
    }

    #[test]
    fn in_and_nin() {
        let db = sample();
        assert_eq!(
            find(&db, json!({"msg_id": {"$in": ["d", "a", "zz", "a"]}})),
            ["a", "d"]
        );
        assert_eq!(
            find(&db, json!({"msg_id": {"$nin": ["d", "a"]}})),
            ["b", "c", "e"]
        );
        assert!(find(&db, json!({"msg_id": {"$in": []}})).is_empty());
        assert_eq!(find(&db, json!({"msg_id": {"$nin": []}})).len(), 5);
        assert_eq!(
            find(&db, json!({"n": {"$in": [1, 2.5, "4"]}})),
            ["a", "b", "d"]
        );
        // null is in a list holding null.
        assert_eq!(
            find(
                &db,
                json!({"completed": {"$in": [null, "2026-11-22T00:00:05+00:00"]}})
            ),
            ["a", "b", "d", "e"]
        );
        // Python's `in` on a string is a substring test...
        assert_eq!(find(&db, json!({"label": {"$in": "xx group_b yy"}})), ["c"]);
        // ...and raises for a non-string needle, so e (label null) matches neither.
        assert_eq!(
            find(&db, json!({"label": {"$nin": "group_b"}})),
            ["a", "b", "d"]
        );
        // On a dict, `in` looks at keys.
        assert_eq!(
            find(
                &db,
                json!({"label": {"$in": {"group_b": 0, "label*task": 1}}})
            ),
            ["c", "d"]
        );
        // ipyparallel's test_label: labelled records.
        assert_eq!(
            find(&db, json!({"label": {"$nin": [""]}})),
            ["a", "b", "c", "d", "e"]
        );
    }

    #[test]
    fn msg_id_fast_path_agrees_with_scan() {
        let db = sample();
        for query in [
            json!({"msg_id": {"$in": ["e", "c", "c", "q", 7]}}),
            json!({"msg_id": {"$in": ["e", "c"]}, "completed": {"$ne": null}}),
            json!({"msg_id": {"$in": ["a", "b"], "$ne": "a"}}),
            json!({"msg_id": "b"}),
            json!({"msg_id": "zz"}),
            json!({"msg_id": {"$in": ["2026-01-01T00:00:00Z", "a"]}}),
        ] {
            let parsed = Query::parse(&query).unwrap();
            let dict = db.dict.as_ref().unwrap();
            let scanned: Vec<&str> = dict
                .live_in_order()
                .filter(|e| parsed.matches(&e.rec))
                .map(Entry::msg_id)
                .collect();
            let fast: Vec<&str> = dict
                .matching(&parsed)
                .into_iter()
                .map(Entry::msg_id)
                .collect();
            assert_eq!(fast, scanned, "{query}");
        }
        assert_eq!(
            find(&db, json!({"msg_id": {"$in": ["e", "c", "c"]}})),
            ["c", "e"]
        );
    }

    #[test]
    fn all_has_mongodb_meaning() {
        let db = sample();
        assert_eq!(find(&db, json!({"tags": {"$all": ["y"]}})), ["c", "d"]);
        assert_eq!(find(&db, json!({"tags": {"$all": ["y", "x"]}})), ["c"]);
        assert!(find(&db, json!({"tags": {"$all": ["y", "z"]}})).is_empty());
        assert!(find(&db, json!({"tags": {"$all": []}})).is_empty());
        // A scalar is a one-element array.
        assert_eq!(find(&db, json!({"label": {"$all": ["group_b"]}})), ["c"]);
    }

    #[test]
    fn mod_follows_python_sign_rules() {
        let db = sample();
        // 1 % 2 == 1; -7 % 2 == 1 in Python; 2.5 % 2 == 0.5; "4" and null never.
        assert_eq!(find(&db, json!({"n": {"$mod": [2, 1]}})), ["a", "c"]);
        assert_eq!(find(&db, json!({"n": {"$mod": [2, 0.5]}})), ["b"]);
        assert_eq!(find(&db, json!({"n": {"$mod": [-3, -1]}})), ["c"]);
        assert_eq!(find(&db, json!({"n": {"$mod": [4, 1.0]}})), ["a", "c"]);
        assert_eq!(find(&db, json!({"n": {"$mod": [-2, -1.5]}})), ["b"]);
        assert!(py_mod_eq(
            &Number::from(7),
            &Number::from(-3),
            &Number::from(-2)
        ));
        assert!(py_mod_eq(
            &Number::from(-7),
            &Number::from(3),
            &Number::from(2)
        ));
        assert!(py_mod_eq(
            &Number::from_f64(-7.5).unwrap(),
            &Number::from(2),
            &Number::from_f64(0.5).unwrap()
        ));
    }

    #[test]
    fn exists_uses_python_truthiness() {
        let db = sample();
        assert_eq!(find(&db, json!({"tags": {"$exists": true}})), ["c", "d"]);
        assert_eq!(
            find(&db, json!({"tags": {"$exists": false}})),
            ["a", "b", "e"]
        );
        assert_eq!(find(&db, json!({"completed": {"$exists": 1}})), ["a", "c"]);
        assert_eq!(
            find(&db, json!({"completed": {"$exists": 0}})),
            ["b", "d", "e"]
        );
        assert_eq!(
            find(&db, json!({"completed": {"$exists": ""}})),
            ["b", "d", "e"]
        );
        assert_eq!(
            find(&db, json!({"completed": {"$exists": [0]}})),
            ["a", "c"]
        );
        // Present but null counts as not existing, as in DictDB.
        assert_eq!(find(&db, json!({"label": {"$exists": false}})), ["e"]);
    }

    #[test]
    fn glob_matches_like_fnmatch() {
        let mut db = store();
        // ipyparallel's test_find_records_glob.
        let labels = [
            "group_a",
            "group_a",
            "group_a/subgroup_a",
            "group_a/subgroup_b",
            "group_b",
            "group_b/subgroup_a",
            "group_b/subgroup_b",
            "group_b/subgroup_c",
            "label*task",
            "label?task",
        ];
        for (i, label) in labels.iter().enumerate() {
            db.add_record(
                &i.to_string(),
                task(&i.to_string(), None, json!({"label": label})),
            )
            .unwrap();
        }
        db.add_record("n", task("n", None, json!({"label": null})))
            .unwrap();
        db.add_record("k", task("k", None, json!({"label": 5})))
            .unwrap();
        let expect = [
            ("group_a*", vec!["0", "1", "2", "3"]),
            ("group_a/subgroup_?", vec!["2", "3"]),
            ("group_b", vec!["4"]),
            ("group_b/subgroup_[ab]", vec!["5", "6"]),
            ("*/subgroup_a", vec!["2", "5"]),
            ("*[*]*", vec!["8"]),
            ("*[?]*", vec!["9"]),
            ("*", vec!["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]),
            ("group_[!a]*", vec!["4", "5", "6", "7"]),
            ("group_b/subgroup_[a-b]", vec!["5", "6"]),
        ];
        for (pattern, want) in expect {
            assert_eq!(
                find(&db, json!({"label": {"$glob": pattern}})),
                want,
                "{pattern}"
            );
        }
    }

    #[test]
    fn glob_edge_cases() {
        let m = |p: &str, s: &str| Glob::new(p).matches(s);
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("*", ""));
        assert!(m("**", "anything/with\nnewline"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(m("a*b*c", "abcbc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("*.py", "dir/file.py"));
        assert!(!m("?", ""));
        assert!(m("??", "\u{e9}\u{e8}"), "characters, not bytes");
        assert!(!m("abc", "ABC"), "case-sensitive on POSIX");
        // Classes.
        assert!(m("[]]", "]"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("[-a]", "-"));
        assert!(m("[a-c-e]", "-") && m("[a-c-e]", "e") && m("[a-c-e]", "b") && !m("[a-c-e]", "d"));
        assert!(m("[\\]", "\\"), "no escapes");
        assert!(!m("[z-a]", "m"), "reversed range matches nothing");
        assert!(m("[!z-a]", "m"));
        // Unterminated `[` is literal.
        assert!(m("[abc", "[abc"));
        assert!(m("x[!", "x[!"));
        assert!(!m("[abc", "a"));
    }

    #[test]
    fn bad_queries() {
        let db = sample();
        assert!(bad(&db, json!({"n": {"$regex": "x"}})).contains("$regex"));
        // A sub-dict that is not operators is not a nested match.
        assert!(bad(&db, json!({"header": {"msg_type": "apply_request"}})).contains("msg_type"));
        bad(&db, json!({"$or": [{"n": 1}]}));
        bad(&db, json!(["n", 1]));
        bad(&db, json!(null));
        bad(&db, json!({"n": {"$in": 3}}));
        bad(&db, json!({"n": {"$nin": null}}));
        bad(&db, json!({"n": {"$all": "x"}}));
        bad(&db, json!({"n": {"$mod": [0, 1]}}));
        bad(&db, json!({"n": {"$mod": [2]}}));
        bad(&db, json!({"n": {"$mod": [2, 1, 0]}}));
        bad(&db, json!({"n": {"$mod": ["2", 1]}}));
        bad(&db, json!({"n": {"$glob": 3}}));
        // Checked even when nothing could match.
        assert!(matches!(
            store().find_records(&json!({"n": {"$bogus": 1}}), None),
            Err(DbError::BadQuery(_))
        ));
        let mut db = db;
        assert!(matches!(
            db.drop_matching_records(&json!({"n": {"$bogus": 1}})),
            Err(DbError::BadQuery(_))
        ));
        assert_eq!(db.len(), 5);
    }

    #[test]
    fn projection() {
        let mut db = store();
        let mut rec = task(
            "m1",
            Some("2026-01-01T00:00:00Z"),
            json!({"header": {"msg_type": "apply_request"}, "extra": 1}),
        );
        rec.buffers = vec![Bytes::from_static(b"b1")];
        rec.result_buffers = vec![Bytes::from_static(b"r1"), Bytes::from_static(b"r2")];
        db.add_record("m1", rec).unwrap();

        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        // No projection: everything, buffers included.
        let all = db.find_records(&json!({}), None).unwrap();
        assert_eq!(all[0].fields.len(), 22);
        assert_eq!(
            all[0].buffers.as_deref(),
            Some(&[Bytes::from_static(b"b1")][..])
        );
        assert_eq!(all[0].result_buffers.as_ref().map(Vec::len), Some(2));
        // Empty keys behave like no keys (DictDB's `if keys:`).
        assert_eq!(db.find_records(&json!({}), Some(&[])).unwrap(), all);

        let found = db
            .find_records(&json!({}), Some(&keys(&["submitted", "completed"])))
            .unwrap();
        assert_eq!(
            found[0].fields,
            fields(json!({"msg_id": "m1", "submitted": "2026-01-01T00:00:00Z", "completed": null}))
        );
        assert_eq!(
            (found[0].buffers.as_ref(), found[0].result_buffers.as_ref()),
            (None, None)
        );

        let found = db
            .find_records(&json!({}), Some(&keys(&["msg_id"])))
            .unwrap();
        assert_eq!(found[0].fields, fields(json!({"msg_id": "m1"})));

        // resubmit_task's projection.
        let found = db
            .find_records(
                &json!({"msg_id": {"$in": ["m1"]}}),
                Some(&keys(&["header", "content", "buffers"])),
            )
            .unwrap();
        assert_eq!(
            found[0].fields,
            fields(
                json!({"msg_id": "m1", "header": {"msg_type": "apply_request"}, "content": null})
            )
        );
        assert_eq!(found[0].buffers.as_ref().map(Vec::len), Some(1));
        assert_eq!(found[0].result_buffers, None);

        let found = db
            .find_records(&json!({}), Some(&keys(&["result_buffers", "extra"])))
            .unwrap();
        assert_eq!(found[0].fields, fields(json!({"msg_id": "m1", "extra": 1})));
        assert_eq!(
            (
                found[0].buffers.is_none(),
                found[0].result_buffers.as_ref().map(Vec::len)
            ),
            (true, Some(2))
        );

        // A standard key missing from a record reads as null; an unknown key
        // is DictDB's KeyError (only when something matched).
        db.add_record("bare", TaskRecord::default()).unwrap();
        let found = db
            .find_records(&json!({"msg_id": "bare"}), Some(&keys(&["label"])))
            .unwrap();
        assert_eq!(
            found[0].fields,
            fields(json!({"msg_id": "bare", "label": null}))
        );
        let err = db
            .find_records(&json!({"msg_id": "m1"}), Some(&keys(&["bogus"])))
            .unwrap_err();
        assert_eq!(err.ename(), "KeyError");
        assert!(
            db.find_records(&json!({"msg_id": "zz"}), Some(&keys(&["bogus"])))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn drop_matching_records_counts_and_ignores_pending_status() {
        let mut db = sample();
        assert_eq!(
            db.drop_matching_records(&json!({"msg_id": {"$in": ["b", "zz"]}}))
                .unwrap(),
            1
        );
        // Pending (completed null) records are dropped if the query says so.
        assert_eq!(
            db.drop_matching_records(&json!({"completed": null, "submitted": {"$ne": null}}))
                .unwrap(),
            1
        );
        assert_eq!(find(&db, json!({})), ["a", "c", "e"]);
        assert_eq!(
            db.drop_matching_records(&json!({"label": "nothing"}))
                .unwrap(),
            0
        );
        assert_eq!(db.drop_matching_records(&json!({})).unwrap(), 3);
        assert!(db.is_empty());
        assert_eq!(db.size_bytes(), 0);
    }

    #[test]
    fn history_is_sorted_by_submitted_instant() {
        let mut db = store();
        let rows = [
            ("late", Some("2026-11-22T10:00:00Z")),
            ("unsubmitted", None),
            ("early-in-offset", Some("2026-11-22T11:00:00+05:00")), // 06:00Z
            ("tie-1", Some("2026-11-22T08:00:00Z")),
            ("tie-2", Some("2026-11-22T08:00:00.000+00:00")),
            ("middle", Some("2026-11-22T03:00:00-05:00")), // 08:00:00Z too
            ("first", Some("2026-11-21T23:59:59.999999Z")),
        ];
        for (id, submitted) in rows {
            db.add_record(id, task(id, submitted, json!({}))).unwrap();
        }
        assert_eq!(
            db.get_history().unwrap(),
            [
                "first",
                "early-in-offset",
                "tie-1",
                "tie-2",
                "middle",
                "late"
            ]
        );
        db.drop_record("tie-1");
        db.add_record(
            "tie-1",
            task("tie-1", Some("2026-11-22T08:00:00Z"), json!({})),
        )
        .unwrap();
        assert_eq!(
            db.get_history().unwrap(),
            [
                "first",
                "early-in-offset",
                "tie-2",
                "middle",
                "tie-1",
                "late"
            ],
            "re-added record is newer for ties"
        );
    }

    #[test]
    fn nodb_stores_nothing_and_refuses_reads() {
        let mut db = RecordStore::new(DbBackend::None);
        db.add_record("m1", task("m1", Some("2026-01-01T00:00:00Z"), json!({})))
            .unwrap();
        db.add_record("m1", task("m1", None, json!({}))).unwrap();
        db.update_record(
            "m1",
            fields(json!({"completed": "2026-01-01T00:00:01Z"})),
            Some(vec![]),
        )
        .unwrap();
        db.update_record("never", Map::new(), None).unwrap();
        db.set_buffers("m1", vec![]).unwrap();
        db.append_stream("m1", "stdout", "x").unwrap();
        db.drop_record("m1");
        assert_eq!(db.drop_matching_records(&json!({})).unwrap(), 0);
        assert!(!db.contains("m1"));
        assert_eq!((db.len(), db.size_bytes()), (0, 0));

        let err = db.get_record("m1").unwrap_err();
        assert_eq!(err.ename(), "NoData");
        assert!(
            err.to_string()
                .starts_with("NoDB backend doesn't store any data.")
        );
        assert!(matches!(
            db.find_records(&json!({}), None),
            Err(DbError::NoData(_))
        ));
        assert!(matches!(db.get_history(), Err(DbError::NoData(_))));
        // A malformed query is still reported as such.
        assert!(matches!(
            db.find_records(&json!({"a": {"$x": 1}}), None),
            Err(DbError::BadQuery(_))
        ));
    }

    #[test]
    fn culls_oldest_fraction_by_count() {
        let mut db = limited(10, usize::MAX, 0.2);
        for i in 0..10 {
            db.add_record(
                &format!("t{i}"),
                task(&format!("t{i}"), Some("2026-01-01T00:00:00Z"), json!({})),
            )
            .unwrap();
        }
        assert_eq!(db.len(), 10);
        db.add_record("t10", task("t10", Some("2026-01-01T00:00:00Z"), json!({})))
            .unwrap();
        // 11 > 10: int(0.2 * 10) = 2 oldest go.
        assert_eq!(db.len(), 9);
        assert!(
            !db.contains("t0") && !db.contains("t1") && db.contains("t2") && db.contains("t10")
        );
        assert!(matches!(db.get_record("t0"), Err(DbError::KeyError(_))));
        let sum: usize = db
            .dict
            .as_ref()
            .unwrap()
            .records
            .values()
            .map(|e| record_size(&e.rec))
            .sum();
        assert_eq!(db.size_bytes(), sum);
    }

    #[test]
    fn count_cull_removes_at_least_one() {
        let mut db = limited(3, usize::MAX, 0.1); // int(0.3) == 0 in DictDB
        for i in 0..5 {
            db.add_record(
                &format!("t{i}"),
                task(&format!("t{i}"), Some("2026-01-01T00:00:00Z"), json!({})),
            )
            .unwrap();
        }
        assert_eq!(db.len(), 3);
        assert_eq!(find(&db, json!({})), ["t2", "t3", "t4"]);
    }

    #[test]
    fn only_submitted_records_are_culled() {
        let mut db = limited(4, usize::MAX, 0.5);
        db.append_stream("orphan", "stdout", "iopub before request")
            .unwrap();
        for i in 0..4 {
            db.add_record(
                &format!("t{i}"),
                task(&format!("t{i}"), Some("2026-01-01T00:00:00Z"), json!({})),
            )
            .unwrap();
        }
        // 5 > 4: the two oldest *submitted* records go; the orphan keeps its place.
        assert_eq!(find(&db, json!({})), ["orphan", "t2", "t3"]);
        // Pending records are not protected.
        assert_eq!(find(&db, json!({"completed": null})).len(), 3);

        // With only unsubmitted records left, culling gives up (DictDB's size
        // cull would spin forever).
        let mut db = limited(1, 10, 0.5);
        db.append_stream("a", "stdout", "0123456789").unwrap();
        db.append_stream("b", "stdout", "0123456789").unwrap();
        assert_eq!(db.len(), 2);
    }

    #[test]
    fn culls_oldest_by_size_down_to_the_fraction() {
        let mut db = limited(usize::MAX, 0, 0.0);
        let mut probe = task("t0", Some("2026-01-01T00:00:00Z"), json!({}));
        probe.buffers = vec![Bytes::from(vec![0u8; 1000])];
        let per_record = record_size(&probe);
        db.add_record("t0", probe).unwrap();
        assert!(db.is_empty(), "a single record over the limit is culled");

        let mut db = limited(usize::MAX, 10 * per_record, 0.3);
        for i in 0..10 {
            let id = format!("t{i}");
            let mut rec = task(&id, Some("2026-01-01T00:00:00Z"), json!({}));
            rec.buffers = vec![Bytes::from(vec![0u8; 1000])];
            db.add_record(&id, rec).unwrap();
        }
        assert_eq!(db.len(), 10);
        assert_eq!(db.size_bytes(), 10 * per_record);
        // One byte over: cull until size <= 0.7 * limit, i.e. 4 records.
        db.append_stream("t9", "stdout", "x").unwrap();
        assert_eq!(find(&db, json!({})), ["t4", "t5", "t6", "t7", "t8", "t9"]);
        assert!(db.size_bytes() <= 7 * per_record);

        // Result buffers arriving through update_record can trigger it too.
        db.update_record(
            "t9",
            Map::new(),
            Some(vec![Bytes::from(vec![0u8; 5 * per_record])]),
        )
        .unwrap();
        assert!(db.size_bytes() <= 7 * per_record);
        assert!(!db.contains("t4"));
    }

    #[test]
    fn memory_stays_flat_over_many_tasks() {
        let mut db = limited(1024, usize::MAX, 0.1);
        for i in 0..100_000u32 {
            let id = format!("task-{i}");
            let mut rec = task(&id, Some("2026-01-01T00:00:00Z"), json!({}));
            rec.buffers = vec![Bytes::from_static(b"payload")];
            db.add_record(&id, rec).unwrap();
            db.append_stream(&id, "stdout", "out").unwrap();
            db.update_record(
                &id,
                fields(json!({"completed": "2026-01-01T00:00:01Z"})),
                None,
            )
            .unwrap();
            if i % 7 == 0 {
                // purge_results of some done tasks leaves stale order slots.
                db.drop_matching_records(&json!({"msg_id": {"$in": [id]}}))
                    .unwrap();
            }
            let dict = db.dict.as_ref().unwrap();
            assert!(dict.records.len() <= 1024);
            assert!(dict.order.len() <= 2 * dict.records.len() + 64 + 1);
        }
        assert!(db.len() > 900);
        assert_eq!(
            db.get_history().unwrap().last().map(String::as_str),
            Some("task-99999")
        );
        let sum: usize = db
            .dict
            .as_ref()
            .unwrap()
            .records
            .values()
            .map(|e| record_size(&e.rec))
            .sum();
        assert_eq!(db.size_bytes(), sum);
    }

    #[test]
    fn re_adding_a_dropped_id_gets_a_fresh_place_in_line() {
        let mut db = limited(3, usize::MAX, 0.34); // culls one at a time
        for id in ["a", "b", "c"] {
            db.add_record(id, task(id, Some("2026-01-01T00:00:00Z"), json!({})))
                .unwrap();
        }
        db.drop_record("a");
        db.add_record("a", task("a", Some("2026-01-01T00:00:00Z"), json!({})))
            .unwrap();
        db.add_record("d", task("d", Some("2026-01-01T00:00:00Z"), json!({})))
            .unwrap();
        // The stale slot of the first "a" must not get the new "a" culled.
        assert_eq!(find(&db, json!({})), ["c", "a", "d"]);
    }

    #[test]
    fn error_names() {
        assert_eq!(DbError::NoData(String::new()).ename(), "NoData");
        assert_eq!(DbError::KeyError(String::new()).ename(), "KeyError");
        assert_eq!(DbError::BadQuery(String::new()).ename(), "ValueError");
    }
}
