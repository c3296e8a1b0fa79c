//! Table work in DuckDB: index the input (cells kept as text, so `00501` stays `00501`),
//! stream its rows as Arrow batches into request shards, write per-shard result rows, and
//! join the results back onto the table for the outputs.

use std::path::{Path, PathBuf};

use duckdb::Connection;
use duckdb::arrow::array::{Array, AsArray, Int64Array};
use duckdb::arrow::datatypes::DataType;
use duckdb::arrow::record_batch::RecordBatch;

use crate::config::LimitsSettings;
use crate::render::RequestTemplate;
use crate::spec::{FieldSpec, FieldType};

/// The column ingest adds: the row's 0-based position in the input.
pub const ROW_INDEX: &str = "_row_index";

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the input could not be read as a table: {0}")]
    Read(String),
    /// The input breaks a rule or a limit; the text says what and what to do.
    #[error("{0}")]
    Input(String),
    #[error("input format of {0:?} is not supported: use .csv, .csv.gz, .tsv, .parquet or .jsonl")]
    Format(String),
    #[error("the table has a column named {0:?}, which rowsmith uses itself; rename it")]
    ReservedColumn(String),
    #[error(
        "data row {} (line {} of a CSV without line breaks in cells): {message}", row_index + 1, row_index + 2
    )]
    Cell { row_index: i64, message: String },
    #[error(
        "row {row_index}'s request is {bytes} bytes, more than the batch limit of {limit} bytes"
    )]
    RowTooLarge {
        row_index: i64,
        bytes: usize,
        limit: u64,
    },
    #[error("table operation failed ({what}): {message}")]
    Duckdb { what: &'static str, message: String },
}

fn duck(what: &'static str) -> impl Fn(duckdb::Error) -> TableError {
    move |error| TableError::Duckdb {
        what,
        message: error.to_string(),
    }
}

/// A SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn path_literal(path: &Path) -> String {
    literal(&path.to_string_lossy())
}

/// Memory DuckDB may use before it spills to disk: the joins and sorts of the final outputs
/// run out of core, so a 10M-row table does not need 10M rows of memory.
pub const DUCKDB_MEMORY_LIMIT: &str = "600MB";

pub fn connect() -> Result<Connection, TableError> {
    let connection = Connection::open_in_memory().map_err(duck("open"))?;
    let spill = std::env::temp_dir().join("rowsmith-duckdb");
    connection
        .execute_batch(&format!(
            "SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'; SET temp_directory = {}; \
             SET autoinstall_known_extensions = false;",
            path_literal(&spill)
        ))
        .map_err(duck("configure"))?;
    Ok(connection)
}

/// What ingest learned of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// The input's columns in order (without `_row_index`).
    pub columns: Vec<String>,
    pub rows: u64,
}

/// The input kinds ingest reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Csv { gzip: bool, tab: bool },
    Parquet,
    Jsonl,
}

fn input_kind(input: &Path) -> Result<InputKind, TableError> {
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.ends_with(".parquet") {
        return Ok(InputKind::Parquet);
    }
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".jsonl.gz") {
        return Ok(InputKind::Jsonl);
    }
    if name.ends_with(".csv") || name.ends_with(".txt") || name.ends_with(".csv.gz") {
        return Ok(InputKind::Csv {
            gzip: name.ends_with(".gz"),
            tab: false,
        });
    }
    if name.ends_with(".tsv") || name.ends_with(".tsv.gz") {
        return Ok(InputKind::Csv {
            gzip: name.ends_with(".gz"),
            tab: true,
        });
    }
    Err(TableError::Format(name))
}

/// What a CSV's first record says: its delimiter and column names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CsvHeader {
    delimiter: u8,
    columns: Vec<String>,
}

/// How much of a CSV is read to find its header and first row.
const HEAD_BYTES: usize = 1 << 20;

/// Checks a CSV before DuckDB reads it, where DuckDB would guess or fail obscurely: empty
/// file, size (after decompression), a gzip stream that ends early, the header's columns
/// (count, duplicates) and at least one data row. Returns the dialect to read it with.
fn preflight_csv(
    input: &Path,
    gzip: bool,
    tab: bool,
    limits: &LimitsSettings,
) -> Result<CsvHeader, TableError> {
    use std::io::Read;
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fail = |message: String| Err(TableError::Input(format!("{name}: {message}")));
    let file = std::fs::File::open(input)
        .map_err(|e| TableError::Input(format!("{name} cannot be opened: {e}")))?;
    let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
    if on_disk == 0 {
        return fail(
            "the file is empty (0 bytes): a header row and at least one data row are needed".into(),
        );
    }
    let mut head = Vec::with_capacity(HEAD_BYTES.min(on_disk as usize * 4));
    let size = if gzip {
        // DuckDB reads a gzip stream cut short without complaint, losing rows: read it to
        // its trailer here, counting what it expands to.
        let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
        let mut buffer = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let read = match decoder.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) => {
                    return fail(format!(
                        "not a complete gzip file ({error}): it may be truncated or not gzip at \
                         all; check it with `gzip -t` and fetch it again"
                    ));
                }
            };
            total += read as u64;
            if total > limits.max_input_bytes {
                return fail(format!(
                    "expands to more than {} bytes (limits.max_input_bytes); split the table \
                     or raise the limit",
                    limits.max_input_bytes
                ));
            }
            if head.len() < HEAD_BYTES {
                let take = read.min(HEAD_BYTES - head.len());
                head.extend_from_slice(&buffer[..take]);
            }
        }
        total
    } else {
        file.take(HEAD_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| TableError::Input(format!("{name} cannot be read: {e}")))?;
        on_disk
    };
    if size > limits.max_input_bytes {
        return fail(format!(
            "{size} bytes is more than limits.max_input_bytes ({}); split the table or raise \
             the limit",
            limits.max_input_bytes
        ));
    }
    let text = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
    if text.iter().all(|b| b.is_ascii_whitespace()) {
        return fail(
            "the file holds no text: a header row and at least one data row are needed".into(),
        );
    }
    let candidates: &[u8] = if tab { b"\t" } else { b",;\t|" };
    let mut best: Option<(u8, csv::StringRecord)> = None;
    for &delimiter in candidates {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(text);
        let mut record = csv::StringRecord::new();
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) if matches!(error.kind(), csv::ErrorKind::Utf8 { .. }) => {
                return fail(
                    "the header is not UTF-8 text: save the file as UTF-8 (e.g. `iconv -f \
                     latin1 -t utf-8 in.csv > out.csv`)"
                        .into(),
                );
            }
            Err(_) => continue,
        }
        if best.as_ref().is_none_or(|(_, b)| record.len() > b.len()) {
            best = Some((delimiter, record));
        }
    }
    let Some((delimiter, header)) = best else {
        return fail("the header row could not be read".into());
    };
    if header.len() > limits.max_columns {
        return fail(format!(
            "{} columns, more than limits.max_columns ({}); keep only the columns the job needs",
            header.len(),
            limits.max_columns
        ));
    }
    let columns: Vec<String> = header
        .iter()
        .enumerate()
        .map(|(i, name)| match name.trim() {
            "" => format!("column{i}"),
            _ => name.to_owned(),
        })
        .collect();
    let mut seen = std::collections::HashMap::new();
    for (i, column) in columns.iter().enumerate() {
        if let Some(first) = seen.insert(column.as_str(), i) {
            return fail(format!(
                "the column name {column:?} appears twice in the header (columns {} and {}); \
                 rename one",
                first + 1,
                i + 1
            ));
        }
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true)
        .from_reader(text);
    let mut record = csv::ByteRecord::new();
    let has_row = loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) if record.iter().all(|f| f.is_empty()) => continue,
            Ok(true) => break true,
            Ok(false) => break false,
            // Cut at the end of what was read: more follows.
            Err(_) => break true,
        }
    };
    if !has_row {
        return fail(format!(
            "a header ({}) but no data rows",
            columns.join(", ")
        ));
    }
    Ok(CsvHeader { delimiter, columns })
}

/// Turns DuckDB's read errors into what the user should know and do.
fn explain_read_error(name: &str, message: &str) -> String {
    let line = message
        .split("Line: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|n| !n.is_empty())
        .map(|n| format!(" (line {n})"))
        .unwrap_or_default();
    let lower = message.to_lowercase();
    if lower.contains("invalid unicode") || lower.contains("utf-8") || lower.contains("utf8") {
        return format!(
            "{name} is not UTF-8 text{line}: save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 \
             in.csv > out.csv`"
        );
    }
    if lower.contains("maximum line size") || lower.contains("max_line_size") {
        return format!(
            "{name} has a line longer than rowsmith reads{line}: a cell is far above \
             limits.max_cell_bytes, or a quote is never closed"
        );
    }
    if lower.contains("unterminated quote") {
        return format!(
            "{name}: a quoted cell is never closed{line}; every `\"` that opens a cell needs a \
             closing `\"` (a quote inside a cell is written `\"\"`)"
        );
    }
    if lower.contains("expected number of columns") {
        let found = message
            .split("Found: ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or("?");
        let expected = message
            .split("Expected Number of Columns: ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or("?");
        return format!(
            "{name}: a row has {found} fields where the header has {expected}{line}; quote \
             cells that contain the delimiter, or fix the row"
        );
    }
    if lower.contains("no magic bytes") || lower.contains("not a parquet file") {
        return format!(
            "{name} is not a Parquet file: export it again as Parquet, or give it the name of \
             its real format (.csv, .jsonl)"
        );
    }
    if lower.contains("out of memory") {
        return format!(
            "{name} is too large for ingest's memory (too many columns or very large cells): \
             keep only the columns the job needs"
        );
    }
    if lower.contains("maximum_object_size") {
        return format!(
            "{name} has a JSON line larger than rowsmith reads{line}: a cell is far above \
             limits.max_cell_bytes"
        );
    }
    let mut text = strip_duckdb_noise(message);
    if text.len() > 400 {
        let mut cut = 400;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    format!("{name} could not be read as a table: {text}")
}

/// How ingest reads an input: the SQL relation, given DuckDB's CSV strict mode.
struct Reader {
    path: String,
    kind: InputKind,
    header: Option<CsvHeader>,
    max_line: u64,
}

impl Reader {
    fn new(input: &Path, limits: &LimitsSettings) -> Result<Self, TableError> {
        let kind = input_kind(input)?;
        let header = match kind {
            InputKind::Csv { gzip, tab } => Some(preflight_csv(input, gzip, tab, limits)?),
            _ => {
                let size = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
                if size > limits.max_input_bytes {
                    return Err(TableError::Input(format!(
                        "{}: {size} bytes is more than limits.max_input_bytes ({}); split the \
                         table or raise the limit",
                        input
                            .file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default(),
                        limits.max_input_bytes
                    )));
                }
                None
            }
        };
        Ok(Self {
            path: path_literal(input),
            kind,
            header,
            max_line: limits.max_cell_bytes.saturating_mul(4).max(2 * 1024 * 1024),
        })
    }

    fn sql(&self, strict: bool) -> String {
        let path = &self.path;
        match (&self.kind, &self.header) {
            // The dialect is fixed from the header rather than sniffed: on a malformed file
            // DuckDB's sniffer settles on another dialect instead of failing. Every cell is
            // text, so values come out exactly as they went in.
            (InputKind::Csv { .. }, Some(header)) => {
                let columns = header
                    .columns
                    .iter()
                    .map(|c| format!("{}: 'VARCHAR'", literal(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "read_csv({path}, delim = {}, quote = '\"', escape = '\"', header = true, \
                     auto_detect = false, strict_mode = {strict}, max_line_size = {}, \
                     columns = {{{columns}}})",
                    literal(&(header.delimiter as char).to_string()),
                    self.max_line
                )
            }
            (InputKind::Parquet, _) => {
                format!("(SELECT COLUMNS(*)::VARCHAR FROM read_parquet({path}))")
            }
            _ => format!(
                "(SELECT COLUMNS(*)::VARCHAR FROM read_json({path}, format = 'newline_delimited'))"
            ),
        }
    }
}

/// Column names rowsmith uses itself.
const RESERVED_COLUMNS: [&str; 2] = [ROW_INDEX, "file_row_number"];

/// The indexed table as a relation with `_row_index` first: the row's position in the file,
/// which the copy of the input kept in input order.
pub fn indexed_relation(indexed: &Path) -> String {
    format!(
        "(SELECT file_row_number AS {ROW_INDEX}, * EXCLUDE (file_row_number) \
         FROM read_parquet({}, file_row_number = true))",
        path_literal(indexed)
    )
}

/// Reads `input` (dialect sniffed, header required) and copies it, in input order and every
/// cell as text, to `indexed` (Parquet). Rows are numbered by their position in that file
/// ([`indexed_relation`]): numbering them in SQL would serialize the copy.
pub fn index_input(
    input: &Path,
    indexed: &Path,
    limits: &LimitsSettings,
) -> Result<TableInfo, TableError> {
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unreadable =
        |e: duckdb::Error| TableError::Input(explain_read_error(&name, &e.to_string()));
    let connection = connect()?;
    let reader = Reader::new(input, limits)?;
    let columns = describe(&connection, &format!("SELECT * FROM {}", reader.sql(true)))
        .map_err(unreadable)?;
    if columns.len() > limits.max_columns {
        return Err(TableError::Input(format!(
            "{name}: {} columns, more than limits.max_columns ({}); keep only the columns the \
             job needs",
            columns.len(),
            limits.max_columns
        )));
    }
    if let Some(reserved) = columns
        .iter()
        .find(|c| RESERVED_COLUMNS.contains(&c.as_str()))
    {
        return Err(TableError::ReservedColumn(reserved.clone()));
    }
    // preserve_insertion_order (on by default) keeps the parallel copy in input order.
    let copy = |strict: bool| {
        connection.execute_batch(&format!(
            "COPY (SELECT * FROM {}) TO {} (FORMAT parquet, COMPRESSION snappy)",
            reader.sql(strict),
            path_literal(indexed)
        ))
    };
    // Strict first: it catches quotes that never close. A file that mixes \r\n and \n line
    // endings fails strict parsing as a whole and is read again leniently (ragged rows are
    // still errors then).
    match copy(true) {
        Err(error) if error.to_string().contains("reached an invalid state") => copy(false),
        other => other,
    }
    .map_err(unreadable)?;
    let rows = parquet_rows(&connection, indexed)?;
    if rows > limits.max_rows {
        return Err(TableError::Input(format!(
            "{name}: {rows} rows, more than limits.max_rows ({}); split the table into several \
             jobs or raise the limit",
            limits.max_rows
        )));
    }
    if rows == 0 {
        return Err(TableError::Input(format!(
            "{name}: no data rows, only a header ({})",
            columns.join(", ")
        )));
    }
    Ok(TableInfo { columns, rows })
}

/// Rows of a Parquet file (from its metadata).
fn parquet_rows(connection: &Connection, path: &Path) -> Result<u64, TableError> {
    let rows: i64 = connection
        .query_row(
            &format!("SELECT count(*) FROM read_parquet({})", path_literal(path)),
            [],
            |r| r.get(0),
        )
        .map_err(duck("count rows"))?;
    Ok(u64::try_from(rows).unwrap_or(0))
}

fn strip_duckdb_noise(message: &str) -> String {
    message
        .lines()
        .take(6)
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_owned()
}

fn describe(connection: &Connection, query: &str) -> Result<Vec<String>, duckdb::Error> {
    let mut statement = connection.prepare(&format!("DESCRIBE {query}"))?;
    let names = statement.query_map([], |row| row.get::<_, String>(0))?;
    names.collect()
}

/// The input columns of an indexed table.
pub fn indexed_columns(indexed: &Path) -> Result<Vec<String>, TableError> {
    let connection = connect()?;
    let columns = describe(
        &connection,
        &format!("SELECT * FROM {}", indexed_relation(indexed)),
    )
    .map_err(duck("describe"))?;
    Ok(columns.into_iter().filter(|c| c != ROW_INDEX).collect())
}

/// Caps of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLimits {
    pub max_requests: u64,
    pub max_bytes: u64,
    /// Bytes of one cell that goes into a request.
    pub max_cell_bytes: u64,
}

/// Where rendered request lines go: one shard at a time, in order.
pub trait ShardSink {
    /// Appends one request line to shard `shard` (opening it on its first line).
    fn write_line(&mut self, shard: u32, line: &[u8]) -> Result<(), TableError>;
    /// Shard `shard` is complete with `requests` lines of `bytes` bytes.
    fn finish(&mut self, shard: u32, requests: u64, bytes: u64) -> Result<(), TableError>;
    /// Row `row_index` makes the same request as row `first`, and is not sent.
    fn duplicate(&mut self, row_index: i64, first: i64) -> Result<(), TableError>;
    /// Row `row_index`'s request (body hash `hash`) has an answer in the result cache, and
    /// is not sent.
    fn cached(&mut self, row_index: i64, hash: u128) -> Result<(), TableError>;
}

/// Body hashes (of one request template) that the result cache can answer.
pub type CacheKeys = std::collections::HashSet<u128>;

/// What a render saw: counts, and each distinct request's body hash with its first row.
#[derive(Debug, Default)]
pub struct Rendered {
    pub stats: RenderStats,
    pub first_with_body: std::collections::HashMap<u128, i64>,
}

/// One shard as it is being filled.
#[derive(Debug, Default)]
struct OpenShard {
    number: u32,
    requests: u64,
    bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderStats {
    pub rows: u64,
    pub skipped: u64,
    /// Rows whose request is identical to an earlier row's (not sent; they share its answer).
    pub duplicates: u64,
    /// Rows answered from the result cache (not sent).
    pub cached: u64,
    pub requests: u64,
    pub shards: u32,
    pub bytes: u64,
}

/// Renders the rows of `indexed` into shards within `limits`, writing them to `sink` in
/// order. With `retry_of`, only the rows that failed retryably in those rows files
/// (the previous attempt's) are rendered.
pub fn render_shards(
    indexed: &Path,
    template: &RequestTemplate,
    limits: ShardLimits,
    retry_of: Option<&[PathBuf]>,
    cache: Option<&CacheKeys>,
    sink: &mut impl ShardSink,
) -> Result<Rendered, TableError> {
    let connection = connect()?;
    // The indexed table is stored in row order and a scan keeps it (preserve_insertion_order);
    // only the semi-join of a retry needs sorting, and its rows are few.
    let order = if retry_of.is_some() {
        format!(" ORDER BY {ROW_INDEX}")
    } else {
        String::new()
    };
    let filter = match retry_of {
        Some([]) => " WHERE false".to_owned(),
        Some(files) => format!(
            " WHERE {ROW_INDEX} IN (SELECT {ROW_INDEX} FROM read_parquet([{}]) \
             WHERE NOT _ok AND _retryable)",
            files
                .iter()
                .map(|p| path_literal(p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    let sql = format!("SELECT * FROM {}{filter}{order}", indexed_relation(indexed));
    // The duplicate map is sized once for every row (counted before the streaming query,
    // which must have the connection to itself): growing it would briefly hold two tables.
    let rows_in_table = parquet_rows(&connection, indexed)?;
    let mut statement = connection.prepare(&sql).map_err(duck("render query"))?;
    let batches = statement.stream_arrow([]).map_err(duck("render query"))?;
    let mut stats = RenderStats::default();
    let (mut scratch, mut escaped, mut line) = (String::new(), Vec::new(), Vec::new());
    let mut shard = OpenShard::default();
    let mut first_with_body: std::collections::HashMap<u128, i64> =
        std::collections::HashMap::with_capacity(usize::try_from(rows_in_table).unwrap_or(0));
    for batch in batches {
        let (row_indexes, cells) = batch_columns(&batch)?;
        for row in 0..batch.num_rows() {
            stats.rows += 1;
            let row_index = row_indexes.value(row);
            let cell = |column: usize| -> Option<&str> { cells[column].get(row) };
            template
                .check_cells(&cell, limits.max_cell_bytes)
                .map_err(|message| TableError::Cell { row_index, message })?;
            line.clear();
            let Some(body_hash) =
                template.render(row_index, cell, &mut scratch, &mut escaped, &mut line)
            else {
                stats.skipped += 1;
                continue;
            };
            // Pay once: a request identical to an earlier row's is not sent; the row takes
            // that row's answer.
            match first_with_body.entry(body_hash) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    stats.duplicates += 1;
                    sink.duplicate(row_index, *first.get())?;
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(row_index);
                }
            }
            // Pay once across jobs: an answer to this very request is in the cache.
            if cache.is_some_and(|keys| keys.contains(&body_hash)) {
                stats.cached += 1;
                sink.cached(row_index, body_hash)?;
                continue;
            }
            if line.len() as u64 > limits.max_bytes {
                return Err(TableError::RowTooLarge {
                    row_index,
                    bytes: line.len(),
                    limit: limits.max_bytes,
                });
            }
            let full = shard.requests >= limits.max_requests
                || shard.bytes + line.len() as u64 > limits.max_bytes;
            if full {
                sink.finish(shard.number, shard.requests, shard.bytes)?;
                shard = OpenShard {
                    number: shard.number + 1,
                    ..OpenShard::default()
                };
            }
            sink.write_line(shard.number, &line)?;
            shard.requests += 1;
            shard.bytes += line.len() as u64;
            stats.requests += 1;
            stats.bytes += line.len() as u64;
        }
    }
    if shard.requests > 0 {
        stats.shards = shard.number + 1;
        sink.finish(shard.number, shard.requests, shard.bytes)?;
    }
    Ok(Rendered {
        stats,
        first_with_body,
    })
}

/// The two halves of a body hash as DuckDB UBIGINTs.
pub fn halves(hash: u128) -> (u64, u64) {
    ((hash >> 64) as u64, hash as u64)
}

/// Reads the body hashes of the result-cache segments `files`.
pub fn read_cache_keys(files: &[PathBuf]) -> Result<CacheKeys, TableError> {
    let mut keys = CacheKeys::new();
    if files.is_empty() {
        return Ok(keys);
    }
    let connection = connect()?;
    let sql = format!(
        "SELECT h_hi, h_lo FROM read_parquet([{}])",
        files
            .iter()
            .map(|p| path_literal(p))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut statement = connection.prepare(&sql).map_err(duck("read cache"))?;
    let mut rows = statement.query([]).map_err(duck("read cache"))?;
    while let Some(row) = rows.next().map_err(duck("read cache"))? {
        let hi: u64 = row.get(0).map_err(duck("read cache"))?;
        let lo: u64 = row.get(1).map_err(duck("read cache"))?;
        keys.insert((u128::from(hi) << 64) | u128::from(lo));
    }
    Ok(keys)
}

/// Writes `(row, body hash)` of every distinct request of a job, streaming (no table in
/// memory), for the cache segment the job adds when it completes.
pub fn write_hashes(
    path: &Path,
    first_with_body: &std::collections::HashMap<u128, i64>,
) -> Result<(), TableError> {
    use std::io::Write;
    let csv = path.with_extension("csv");
    let io = |e: std::io::Error| TableError::Duckdb {
        what: "write hashes",
        message: e.to_string(),
    };
    {
        let mut writer = std::io::BufWriter::new(std::fs::File::create(&csv).map_err(io)?);
        writeln!(writer, "{ROW_INDEX},h_hi,h_lo").map_err(io)?;
        for (hash, row) in first_with_body {
            let (hi, lo) = halves(*hash);
            writeln!(writer, "{row},{hi},{lo}").map_err(io)?;
        }
        writer.flush().map_err(io)?;
    }
    let connection = connect()?;
    connection
        .execute_batch(&format!(
            "COPY (SELECT * FROM read_csv({}, header = true, columns = {{'{ROW_INDEX}': 'BIGINT', \
             'h_hi': 'UBIGINT', 'h_lo': 'UBIGINT'}})) TO {} (FORMAT parquet)",
            path_literal(&csv),
            path_literal(path)
        ))
        .map_err(duck("write hashes"))?;
    std::fs::remove_file(&csv).map_err(io)
}

/// Writes the rows served from the cache as a rows file (attempt 0): `hits` is a CSV of
/// `_row_index,h_hi,h_lo` (what the render sink wrote), `segments` the cache files.
/// Returns how many rows it wrote.
pub fn write_cached_rows(
    hits: &Path,
    segments: &[PathBuf],
    fields: &[FieldSpec],
    out: &Path,
) -> Result<u64, TableError> {
    let connection = connect()?;
    let columns: Vec<String> = fields
        .iter()
        .map(|f| format!("c.{}", ident(&f.name)))
        .collect();
    let segments = segments
        .iter()
        .map(|p| path_literal(p))
        .collect::<Vec<_>>()
        .join(", ");
    connection
        .execute_batch(&format!(
            "CREATE TABLE cached AS SELECT h.{ROW_INDEX}, 0 AS _attempt, true AS _ok, \
             false AS _retryable, NULL::VARCHAR AS _reason, NULL::VARCHAR AS _message, {} \
             FROM read_csv({}, header = true, columns = {{'{ROW_INDEX}': 'BIGINT', \
             'h_hi': 'UBIGINT', 'h_lo': 'UBIGINT'}}) h \
             JOIN (SELECT * FROM read_parquet([{segments}], union_by_name = true) \
                   QUALIFY row_number() OVER (PARTITION BY h_hi, h_lo) = 1) c \
             USING (h_hi, h_lo); \
             COPY cached TO {} (FORMAT parquet)",
            columns.join(", "),
            path_literal(hits),
            path_literal(out)
        ))
        .map_err(duck("write cached rows"))?;
    let rows: i64 = connection
        .query_row("SELECT count(*) FROM cached", [], |r| r.get(0))
        .map_err(duck("count cached rows"))?;
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// A text column of an Arrow batch, whichever string layout DuckDB chose.
enum TextColumn<'a> {
    Utf8(&'a duckdb::arrow::array::StringArray),
    Large(&'a duckdb::arrow::array::LargeStringArray),
    View(&'a duckdb::arrow::array::StringViewArray),
}

impl<'a> TextColumn<'a> {
    fn get(&self, row: usize) -> Option<&'a str> {
        match self {
            TextColumn::Utf8(a) => a.is_valid(row).then(|| a.value(row)),
            TextColumn::Large(a) => a.is_valid(row).then(|| a.value(row)),
            TextColumn::View(a) => a.is_valid(row).then(|| a.value(row)),
        }
    }
}

fn batch_columns(batch: &RecordBatch) -> Result<(&Int64Array, Vec<TextColumn<'_>>), TableError> {
    let unexpected = |what: String| TableError::Duckdb {
        what: "read batch",
        message: what,
    };
    let row_indexes = batch
        .column(0)
        .as_primitive_opt::<duckdb::arrow::datatypes::Int64Type>()
        .ok_or_else(|| unexpected(format!("{ROW_INDEX} is not BIGINT")))?;
    let mut cells = Vec::with_capacity(batch.num_columns() - 1);
    for column in batch.columns().iter().skip(1) {
        let text = match column.data_type() {
            DataType::Utf8 => TextColumn::Utf8(column.as_string::<i32>()),
            DataType::LargeUtf8 => TextColumn::Large(column.as_string::<i64>()),
            DataType::Utf8View => TextColumn::View(column.as_string_view()),
            other => return Err(unexpected(format!("a column is {other}, not text"))),
        };
        cells.push(text);
    }
    Ok((row_indexes, cells))
}

/// One row's merged result: the field values as text, or why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct RowResult {
    pub row_index: i64,
    /// `None` when the row succeeded.
    pub failure: Option<RowFailure>,
    /// One value per field, in the spec's order (`None` for a failed row).
    pub values: Vec<Option<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RowFailure {
    /// A short code: `http_error`, `invalid_json`, `missing_field`, `wrong_type`,
    /// `not_in_enum`, `no_result`, …
    pub reason: String,
    pub message: String,
    /// Whether another attempt may succeed (a server error, a malformed answer, expiry),
    /// as opposed to a permanent refusal or invalid request.
    pub retryable: bool,
}

fn rows_table_sql(table: &str, fields: &[FieldSpec]) -> String {
    let mut sql = format!(
        "CREATE OR REPLACE TABLE {table} ({ROW_INDEX} BIGINT, _attempt INTEGER, _ok BOOLEAN, \
         _retryable BOOLEAN, _reason VARCHAR, _message VARCHAR"
    );
    for field in fields {
        sql.push_str(&format!(", {} VARCHAR", ident(&field.name)));
    }
    sql.push(')');
    sql
}

/// Writes the rows that repeat an earlier row's request: `(row, first row with that request)`.
pub fn write_duplicates(path: &Path, pairs: &[(i64, i64)]) -> Result<(), TableError> {
    let connection = connect()?;
    connection
        .execute_batch(&format!(
            "CREATE TABLE duplicates ({ROW_INDEX} BIGINT, _first BIGINT)"
        ))
        .map_err(duck("duplicates table"))?;
    {
        let mut appender = connection
            .appender("duplicates")
            .map_err(duck("append duplicates"))?;
        for (row, first) in pairs {
            appender
                .append_row([*row, *first])
                .map_err(duck("append duplicates"))?;
        }
        appender.flush().map_err(duck("append duplicates"))?;
    }
    connection
        .execute_batch(&format!(
            "COPY duplicates TO {} (FORMAT parquet)",
            path_literal(path)
        ))
        .map_err(duck("write duplicates"))
}

/// Writes one shard attempt's merged rows as Parquet.
pub fn write_rows(
    path: &Path,
    fields: &[FieldSpec],
    attempt: u32,
    rows: &[RowResult],
) -> Result<(), TableError> {
    let connection = connect()?;
    connection
        .execute_batch(&rows_table_sql("results", fields))
        .map_err(duck("rows table"))?;
    {
        let mut appender = connection
            .appender("results")
            .map_err(duck("append rows"))?;
        for row in rows {
            let mut params: Vec<duckdb::types::Value> = vec![
                duckdb::types::Value::BigInt(row.row_index),
                duckdb::types::Value::Int(i32::try_from(attempt).unwrap_or(i32::MAX)),
                duckdb::types::Value::Boolean(row.failure.is_none()),
                duckdb::types::Value::Boolean(row.failure.as_ref().is_some_and(|f| f.retryable)),
                text_value(row.failure.as_ref().map(|f| f.reason.as_str())),
                text_value(row.failure.as_ref().map(|f| f.message.as_str())),
            ];
            for index in 0..fields.len() {
                params.push(text_value(row.values.get(index).and_then(|v| v.as_deref())));
            }
            appender
                .append_row(duckdb::appender_params_from_iter(params))
                .map_err(duck("append rows"))?;
        }
        appender.flush().map_err(duck("append rows"))?;
    }
    connection
        .execute_batch(&format!(
            "COPY results TO {} (FORMAT parquet)",
            path_literal(path)
        ))
        .map_err(duck("write rows"))?;
    Ok(())
}

fn text_value(text: Option<&str>) -> duckdb::types::Value {
    match text {
        Some(text) => duckdb::types::Value::Text(text.to_owned()),
        None => duckdb::types::Value::Null,
    }
}

/// Where the final outputs go (local files).
#[derive(Debug, Clone)]
pub struct FinalOutputs {
    pub enriched_csv: Option<PathBuf>,
    pub enriched_parquet: Option<PathBuf>,
    /// One JSON object per line.
    pub enriched_jsonl: Option<PathBuf>,
    pub failures_csv: PathBuf,
    /// `output.csv_formula_escape`.
    pub csv_formula_escape: bool,
    /// Where to write the result-cache segment of this job's answers (`hashes` given).
    pub cache_segment: Option<PathBuf>,
    /// The last attempt sent with the job's own provider and model: answers of a fallback
    /// attempt came from another request and are not cached under this one.
    pub cache_last_attempt: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinalCounts {
    pub enriched_rows: u64,
    pub failed_rows: u64,
}

/// Joins the merged rows onto the indexed table: `enriched` holds every row that did not
/// fail (skipped rows with empty new columns), in input order; `failures` the failed rows
/// with their reason and original cells.
pub fn finalize(
    indexed: &Path,
    rows_files: &[PathBuf],
    duplicates: Option<&Path>,
    cached: Option<&Path>,
    hashes: Option<&Path>,
    fields: &[FieldSpec],
    outputs: &FinalOutputs,
) -> Result<FinalCounts, TableError> {
    let connection = connect()?;
    connection
        .execute_batch(&rows_table_sql("attempts", fields))
        .map_err(duck("results table"))?;
    if !rows_files.is_empty() {
        let files: Vec<String> = rows_files.iter().map(|p| path_literal(p)).collect();
        connection
            .execute_batch(&format!(
                "INSERT INTO attempts BY NAME SELECT * FROM read_parquet([{}])",
                files.join(", ")
            ))
            .map_err(duck("read results"))?;
    }
    if let Some(cached) = cached {
        // Rows answered from the result cache: attempt 0, before any sent attempt.
        connection
            .execute_batch(&format!(
                "INSERT INTO attempts BY NAME SELECT * FROM read_parquet({})",
                path_literal(cached)
            ))
            .map_err(duck("read cached rows"))?;
    }
    if let Some(duplicates) = duplicates {
        // A row that repeated an earlier row's request shares that row's answers.
        connection
            .execute_batch(&format!(
                "INSERT INTO attempts BY NAME SELECT d.{ROW_INDEX} AS {ROW_INDEX}, a.* EXCLUDE ({ROW_INDEX}) \
                 FROM read_parquet({}) d JOIN attempts a ON a.{ROW_INDEX} = d._first",
                path_literal(duplicates)
            ))
            .map_err(duck("read duplicates"))?;
    }
    // A row's result is its latest attempt's; `_attempts` counts how often it was sent.
    connection
        .execute_batch(&format!(
            "CREATE TABLE results AS SELECT *, count(*) OVER (PARTITION BY {ROW_INDEX}) AS _attempts \
             FROM attempts \
             QUALIFY row_number() OVER (PARTITION BY {ROW_INDEX} ORDER BY _attempt DESC) = 1"
        ))
        .map_err(duck("latest results"))?;
    connection
        .execute_batch(&format!(
            "CREATE VIEW input AS SELECT * FROM {}",
            indexed_relation(indexed)
        ))
        .map_err(duck("read input"))?;
    // Generated text is untrusted (a row can steer the model): in CSV, a cell a spreadsheet
    // would run as a formula is prefixed with `'`. Numbers (`-3`) are left alone.
    let text_fields: Vec<String> = fields
        .iter()
        .map(|f| {
            let column = format!("r.{}", ident(&f.name));
            match outputs.csv_formula_escape
                && !matches!(f.field_type, FieldType::Number | FieldType::Boolean)
            {
                true => format!(
                    "CASE WHEN regexp_matches({column}, '^[=+\\-@\t\r]') \
                     AND TRY_CAST({column} AS DOUBLE) IS NULL \
                     THEN '''' || {column} ELSE {column} END AS {}",
                    ident(&f.name)
                ),
                false => column,
            }
        })
        .collect();
    let typed_fields: Vec<String> = fields
        .iter()
        .map(|f| {
            let column = format!("r.{}", ident(&f.name));
            match f.field_type {
                FieldType::Number => format!("TRY_CAST({column} AS DOUBLE) AS {}", ident(&f.name)),
                FieldType::Boolean => {
                    format!("TRY_CAST({column} AS BOOLEAN) AS {}", ident(&f.name))
                }
                FieldType::Array => {
                    format!(
                        "TRY_CAST(TRY_CAST({column} AS JSON) AS VARCHAR[]) AS {}",
                        ident(&f.name)
                    )
                }
                _ => column,
            }
        })
        .collect();
    let enriched = |select_fields: &[String]| {
        format!(
            "SELECT i.* EXCLUDE ({ROW_INDEX}), {} FROM input i LEFT JOIN results r USING ({ROW_INDEX}) \
             WHERE r._ok IS NULL OR r._ok ORDER BY i.{ROW_INDEX}",
            select_fields.join(", ")
        )
    };
    // CSV keeps every value as text; Parquet and JSON lines type the new columns.
    let formats = [
        (
            &outputs.enriched_csv,
            "FORMAT csv, HEADER true",
            &text_fields,
        ),
        (
            &outputs.enriched_parquet,
            "FORMAT parquet, COMPRESSION zstd",
            &typed_fields,
        ),
        (&outputs.enriched_jsonl, "FORMAT json", &typed_fields),
    ];
    for (target, options, select_fields) in formats {
        let Some(path) = target else { continue };
        connection
            .execute_batch(&format!(
                "COPY ({}) TO {} ({options})",
                enriched(select_fields),
                path_literal(path)
            ))
            .map_err(duck("write enriched output"))?;
    }
    connection
        .execute_batch(&format!(
            "COPY (SELECT r.{ROW_INDEX}, r._reason, r._message, r._attempts, i.* EXCLUDE ({ROW_INDEX}) \
             FROM results r JOIN input i USING ({ROW_INDEX}) WHERE NOT r._ok ORDER BY r.{ROW_INDEX}) \
             TO {} (FORMAT csv, HEADER true)",
            path_literal(&outputs.failures_csv)
        ))
        .map_err(duck("write failures csv"))?;
    if let (Some(hashes), Some(segment)) = (hashes, &outputs.cache_segment) {
        // The answers this job paid for, by request body, for later jobs to reuse.
        let columns: Vec<String> = fields
            .iter()
            .map(|f| format!("r.{}", ident(&f.name)))
            .collect();
        connection
            .execute_batch(&format!(
                "COPY (SELECT h.h_hi, h.h_lo, {} FROM results r \
                 JOIN read_parquet({}) h USING ({ROW_INDEX}) \
                 WHERE r._ok AND r._attempt > 0 AND r._attempt <= {}) \
                 TO {} (FORMAT parquet, COMPRESSION zstd)",
                columns.join(", "),
                path_literal(hashes),
                outputs.cache_last_attempt,
                path_literal(segment)
            ))
            .map_err(duck("write cache segment"))?;
    }
    let count = |sql: &str| -> Result<u64, TableError> {
        let n: i64 = connection
            .query_row(sql, [], |r| r.get(0))
            .map_err(duck("count"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok(FinalCounts {
        enriched_rows: count(&format!(
            "SELECT count(*) FROM input i LEFT JOIN results r USING ({ROW_INDEX}) WHERE r._ok IS NULL OR r._ok"
        ))?,
        failed_rows: count("SELECT count(*) FROM results WHERE NOT _ok")?,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn indexing_keeps_text_and_order_of_a_large_csv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.csv");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&input).expect("create"));
        writeln!(file, "id,zip,price,description").expect("write");
        let rows = 300_000;
        for i in 0..rows {
            writeln!(
                file,
                "{i},00{},1.50,\"row {i}, with \"\"quotes\"\"\nand a newline\"",
                i % 900
            )
            .expect("write");
        }
        drop(file);
        let indexed = dir.path().join("indexed.parquet");
        let info = index_input(&input, &indexed, &Default::default()).expect("index");
        assert_eq!(info.rows, rows);
        assert_eq!(info.columns, ["id", "zip", "price", "description"]);
        let connection = connect().expect("connect");
        let mismatches: i64 = connection
            .query_row(
                &format!(
                    "SELECT count(*) FROM {} WHERE CAST(id AS BIGINT) <> {ROW_INDEX} \
                     OR price <> '1.50' OR NOT starts_with(zip, '00')",
                    indexed_relation(&indexed)
                ),
                [],
                |r| r.get(0),
            )
            .expect("query");
        assert_eq!(mismatches, 0);
    }

    #[test]
    fn gzipped_csv_and_jsonl_inputs_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gz = dir.path().join("in.csv.gz");
        let connection = connect().expect("connect");
        connection
            .execute_batch(&format!(
                "COPY (SELECT '00' || i AS zip, 'text ' || i AS description FROM range(5) t(i)) TO {} (FORMAT csv, HEADER true, COMPRESSION gzip)",
                path_literal(&gz)
            ))
            .expect("write gz");
        let info =
            index_input(&gz, &dir.path().join("a.parquet"), &Default::default()).expect("index gz");
        assert_eq!(
            (info.rows, info.columns.clone()),
            (5, vec!["zip".to_owned(), "description".to_owned()])
        );
        let jsonl = dir.path().join("in.jsonl");
        std::fs::write(&jsonl, "{\"sku\":\"00501\",\"description\":\"a ball\"}\n{\"sku\":\"00502\",\"description\":null}\n")
            .expect("write jsonl");
        let info = index_input(&jsonl, &dir.path().join("b.parquet"), &Default::default())
            .expect("index jsonl");
        assert_eq!(
            (info.rows, info.columns),
            (2, vec!["sku".to_owned(), "description".to_owned()])
        );
        let sku: String = connection
            .query_row(
                &format!(
                    "SELECT sku FROM {} WHERE {ROW_INDEX} = 0",
                    indexed_relation(&dir.path().join("b.parquet"))
                ),
                [],
                |r| r.get(0),
            )
            .expect("sku");
        assert_eq!(sku, "00501");
    }

    #[test]
    fn unsupported_input_says_which_formats_work() {
        let error = index_input(
            Path::new("/x/table.xlsx"),
            Path::new("/x/o.parquet"),
            &Default::default(),
        )
        .unwrap_err();
        assert!(error.to_string().contains(".csv"), "{error}");
    }

    #[test]
    fn the_input_size_limit_holds_for_every_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = LimitsSettings {
            max_input_bytes: 100,
            ..Default::default()
        };
        let jsonl = dir.path().join("big.jsonl");
        let line = "{\"sku\": \"00501\", \"description\": \"a sturdy thing\"}\n";
        std::fs::write(&jsonl, line.repeat(10)).expect("write");
        let error = index_input(&jsonl, &dir.path().join("o.parquet"), &limits).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("more than limits.max_input_bytes (100)"),
            "{error}"
        );
        let csv = dir.path().join("big.csv");
        std::fs::write(&csv, format!("sku,description\n{}", "1,abc\n".repeat(50))).expect("write");
        let error = index_input(&csv, &dir.path().join("p.parquet"), &limits).unwrap_err();
        assert!(
            error.to_string().contains("limits.max_input_bytes"),
            "{error}"
        );
    }
}
