//! Table work in DuckDB: index the input (cells kept as text, so `00501` stays `00501`),
//! stream its rows as Arrow batches into request shards, write per-shard result rows, and
//! join the results back onto the table for the outputs.

use std::path::{Path, PathBuf};

use duckdb::Connection;
use duckdb::arrow::array::{Array, AsArray, Int64Array};
use duckdb::arrow::datatypes::DataType;
use duckdb::arrow::record_batch::RecordBatch;

use crate::render::RequestTemplate;
use rowsmith_config::{DuckdbLimits, LimitsSettings};
use rowsmith_contract::spec::{FieldSpec, FieldType};

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
    /// DuckDB needed more than `duckdb.memory_limit` for a step that cannot spill.
    #[error(
        "{what}: DuckDB ran out of memory ({message}); raise duckdb.memory_limit \
         (ROWSMITH_DUCKDB__MEMORY_LIMIT, e.g. 2GiB) or lower duckdb.threads \
         (ROWSMITH_DUCKDB__THREADS) in the config of the service that failed"
    )]
    OutOfMemory { what: &'static str, message: String },
    #[error("DuckDB's spill directory could not be created in TMPDIR: {0}")]
    Spill(#[source] std::io::Error),
    /// A local file (a shard being written, a scratch file) could not be written.
    #[error("cannot {what} {}: {source}", path.display())]
    LocalFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TableError {
    /// An error of writing the local file `path`, for `map_err`.
    pub fn writing(path: &Path) -> impl Fn(std::io::Error) -> TableError + Copy + '_ {
        move |source| TableError::LocalFile {
            what: "write",
            path: path.to_owned(),
            source,
        }
    }
}

fn duck(what: &'static str) -> impl Fn(duckdb::Error) -> TableError {
    move |error| duck_error(what, &error)
}

fn duck_error(what: &'static str, error: &duckdb::Error) -> TableError {
    let message = error.to_string();
    match out_of_memory(&message) {
        Some(message) => TableError::OutOfMemory { what, message },
        None => TableError::Duckdb { what, message },
    }
}

/// DuckDB's own words when `message` is its out-of-memory error (the first line, without
/// the generic advice that follows).
fn out_of_memory(message: &str) -> Option<String> {
    let first = message.lines().next()?.trim();
    first
        .to_lowercase()
        .contains("out of memory")
        .then(|| first.to_owned())
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

/// One DuckDB instance and the directory it alone spills to. DuckDB deletes every spill
/// file of its directory when an instance closes (duckdb/duckdb#15173), so instances that
/// shared one would destroy each other's.
pub struct Db {
    /// Declared first: it is closed before its spill directory is removed.
    connection: Connection,
    spill: tempfile::TempDir,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Db")
            .field("spill", &self.spill.path())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Db {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.connection
    }
}

/// Opens an in-memory DuckDB within `limits` (`duckdb.*`): what does not fit, the joins,
/// sorts and tables of the outputs, spills to a temporary directory of its own.
pub fn connect(limits: &DuckdbLimits) -> Result<Db, TableError> {
    let spill = tempfile::Builder::new()
        .prefix("rowsmith-duckdb-")
        .tempdir()
        .map_err(TableError::Spill)?;
    let connection = Connection::open_in_memory().map_err(duck("open"))?;
    connection
        .execute_batch(&format!(
            "SET memory_limit = '{}B'; SET threads = {}; SET temp_directory = {}; \
             SET preserve_insertion_order = true; SET autoinstall_known_extensions = false;",
            limits.memory_limit_bytes,
            limits.threads.max(1),
            path_literal(spill.path())
        ))
        .map_err(duck("configure"))?;
    Ok(Db { connection, spill })
}

/// Rows a Parquet row group may hold: the writer keeps a whole row group in memory (per
/// thread) and cannot spill it, so it is bounded in bytes, 1/8 of one thread's share of
/// the memory limit (1 to 64 MiB), for rows of `row_bytes` bytes on average; at most
/// DuckDB's default of 122,880 rows. DuckDB's own `ROW_GROUP_SIZE_BYTES` only works without
/// `preserve_insertion_order`, which the indexed copy needs (a row's number is its position
/// in the file), so the bound is given in rows. DuckDB moves rows 2,048 at a time, so a
/// smaller bound writes one group per such chunk: memory must still hold a few chunks.
fn row_group_rows(limits: &DuckdbLimits, row_bytes: u64) -> u64 {
    let per_thread = limits.memory_limit_bytes / limits.threads.max(1) as u64;
    let group_bytes = (per_thread / 8).clamp(1 << 20, 64 << 20);
    (group_bytes / row_bytes.max(1)).clamp(64, 122_880)
}

/// The `ROW_GROUP_SIZE` option of a Parquet COPY of rows of `row_bytes` bytes on average.
fn row_groups(limits: &DuckdbLimits, row_bytes: u64) -> String {
    format!("ROW_GROUP_SIZE {}", row_group_rows(limits, row_bytes))
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
    /// Bytes of a data row on average in the first MiB (at least that MiB when a row is
    /// longer): what sizes the indexed copy's row groups.
    row_bytes: u64,
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
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let checked = || -> Result<CsvHeader, String> {
        let (head, size) = read_head(input, gzip, limits)?;
        let text = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
        if text.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(
                "the file holds no text: a header row and at least one data row are needed".into(),
            );
        }
        let (delimiter, header) = sniff_header(text, tab)?;
        let columns = header_columns(&header, limits)?;
        if !has_data_row(text, delimiter) {
            return Err(format!(
                "a header ({}) but no data rows",
                columns.join(", ")
            ));
        }
        Ok(CsvHeader {
            delimiter,
            columns,
            row_bytes: head_row_bytes(text, delimiter, (head.len() as u64) < size),
        })
    };
    checked().map_err(|message| TableError::Input(format!("{name}: {message}")))
}

/// The first `HEAD_BYTES` of the table's text and its whole size, decompressed. A gzip
/// stream is read to its trailer: DuckDB reads one cut short without complaint, losing rows.
fn read_head(input: &Path, gzip: bool, limits: &LimitsSettings) -> Result<(Vec<u8>, u64), String> {
    use std::io::Read;
    let file = std::fs::File::open(input).map_err(|e| format!("cannot be opened: {e}"))?;
    let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
    if on_disk == 0 {
        return Err(
            "the file is empty (0 bytes): a header row and at least one data row are needed".into(),
        );
    }
    let mut head = Vec::with_capacity(HEAD_BYTES.min(on_disk as usize * 4));
    if !gzip {
        file.take(HEAD_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if on_disk > limits.max_input_bytes {
            return Err(format!(
                "{on_disk} bytes is more than limits.max_input_bytes ({}); split the table or \
                 raise the limit",
                limits.max_input_bytes
            ));
        }
        return Ok((head, on_disk));
    }
    let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let read = match decoder.read(&mut buffer) {
            Ok(0) => return Ok((head, total)),
            Ok(read) => read,
            Err(error) => {
                return Err(format!(
                    "not a complete gzip file ({error}): it may be truncated or not gzip at \
                     all; check it with `gzip -t` and fetch it again"
                ));
            }
        };
        total += read as u64;
        if total > limits.max_input_bytes {
            return Err(format!(
                "expands to more than {} bytes (limits.max_input_bytes); split the table or \
                 raise the limit",
                limits.max_input_bytes
            ));
        }
        if head.len() < HEAD_BYTES {
            let take = read.min(HEAD_BYTES - head.len());
            head.extend_from_slice(&buffer[..take]);
        }
    }
}

/// The delimiter (`tab` only, or the one of `,;\t|` that splits the first record into the
/// most fields) and the header record it gives.
fn sniff_header(text: &[u8], tab: bool) -> Result<(u8, csv::StringRecord), String> {
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
                return Err(
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
    best.ok_or_else(|| "the header row could not be read".into())
}

/// The header's column names (`column<i>` for an empty one), within `limits.max_columns` and
/// each once.
fn header_columns(
    header: &csv::StringRecord,
    limits: &LimitsSettings,
) -> Result<Vec<String>, String> {
    if header.len() > limits.max_columns {
        return Err(format!(
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
            return Err(format!(
                "the column name {column:?} appears twice in the header (columns {} and {}); \
                 rename one",
                first + 1,
                i + 1
            ));
        }
    }
    Ok(columns)
}

/// Whether a record with a non-empty field follows the header in `text` (a record cut at the
/// end of the head counts: more follows).
fn has_data_row(text: &[u8], delimiter: u8) -> bool {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true)
        .from_reader(text);
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) if record.iter().all(|f| f.is_empty()) => continue,
            Ok(true) => return true,
            Ok(false) => return false,
            Err(_) => return true,
        }
    }
}

/// Bytes of a data row on average in `text`, the head of a CSV (`cut` when more follows, so
/// its last record may be partial). A head without one whole data row gives its own length.
fn head_row_bytes(text: &[u8], delimiter: u8, cut: bool) -> u64 {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(text);
    let mut record = csv::ByteRecord::new();
    if !matches!(reader.read_byte_record(&mut record), Ok(true)) {
        return text.len() as u64;
    }
    let header_end = reader.position().byte();
    let (mut rows, mut end, mut previous_end) = (0u64, header_end, header_end);
    while let Ok(true) = reader.read_byte_record(&mut record) {
        rows += 1;
        previous_end = end;
        end = reader.position().byte();
    }
    if cut && rows > 0 {
        rows -= 1;
        end = previous_end;
    }
    match rows {
        0 => text.len() as u64 - header_end,
        rows => (end - header_end) / rows,
    }
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
        // A cell longer than a read buffer ends the buffer inside its quotes, which DuckDB
        // cannot tell from a quote that never closes.
        return format!(
            "{name}: a quoted cell is never closed{line}, or is far above \
             limits.max_cell_bytes; every `\"` that opens a cell needs a closing `\"` (a quote \
             inside a cell is written `\"\"`)"
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
    /// Bytes of an input row on average, as text: from the CSV's head, the first MiB of
    /// JSON lines, or a Parquet file's metadata.
    fn row_bytes(&self, input: &Path, connection: &Connection) -> Result<u64, TableError> {
        match (&self.kind, &self.header) {
            (InputKind::Csv { .. }, Some(header)) => Ok(header.row_bytes),
            (InputKind::Parquet, _) => parquet_row_bytes(connection, &self.path).map_err(|e| {
                TableError::Input(explain_read_error(&file_name(input), &e.to_string()))
            }),
            _ => {
                use std::io::Read;
                let file = std::fs::File::open(input).map_err(|e| {
                    TableError::Input(format!("{} cannot be opened: {e}", file_name(input)))
                })?;
                let reader: Box<dyn Read> = match file_name(input).to_lowercase().ends_with(".gz") {
                    true => Box::new(flate2::read::MultiGzDecoder::new(file)),
                    false => Box::new(file),
                };
                let mut head = Vec::with_capacity(HEAD_BYTES);
                // A broken stream is reported by the copy itself.
                let _ = reader.take(HEAD_BYTES as u64).read_to_end(&mut head);
                let lines = head.iter().filter(|&&b| b == b'\n').count() as u64;
                Ok(head.len() as u64 / lines.max(1))
            }
        }
    }

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
                     buffer_size = {}, columns = {{{columns}}})",
                    literal(&(header.delimiter as char).to_string()),
                    self.max_line,
                    csv_buffer_bytes(self.max_line)
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

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Bytes of one CSV read buffer (DuckDB holds one per thread, and one more ahead): twice the
/// longest line, at least 16 MiB. DuckDB's default is 16 lines of `max_line_size`, 64 MiB
/// for rowsmith's, which alone would not fit a small memory limit.
fn csv_buffer_bytes(max_line: u64) -> u64 {
    max_line.saturating_mul(2).max(16 * 1024 * 1024)
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
    duckdb: &DuckdbLimits,
) -> Result<TableInfo, TableError> {
    let name = file_name(input);
    let unreadable = |e: duckdb::Error| match out_of_memory(&e.to_string()) {
        Some(message) => TableError::OutOfMemory {
            what: "indexing the input",
            message,
        },
        None => TableError::Input(explain_read_error(&name, &e.to_string())),
    };
    let connection = connect(duckdb)?;
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
    // Each cell is held as a string (16 bytes beside its text).
    let row_bytes = reader.row_bytes(input, &connection)? + 16 * columns.len() as u64;
    // preserve_insertion_order keeps the parallel copy in input order.
    let copy = |strict: bool| {
        connection.execute_batch(&format!(
            "COPY (SELECT * FROM {}) TO {} (FORMAT parquet, COMPRESSION snappy, {})",
            reader.sql(strict),
            path_literal(indexed),
            row_groups(duckdb, row_bytes)
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
pub fn indexed_columns(indexed: &Path, duckdb: &DuckdbLimits) -> Result<Vec<String>, TableError> {
    let connection = connect(duckdb)?;
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
    /// The fewest requests a shard may hold (Bedrock's per-job minimum; 1 elsewhere): a
    /// short last shard is made up from the one before (the `BalancedTail` of `tail`, which
    /// the shard preparation puts before the sink).
    pub min_requests: u64,
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
    duckdb: &DuckdbLimits,
) -> Result<Rendered, TableError> {
    let connection = connect(duckdb)?;
    // The duplicate map is sized once for every row (counted before the streaming query,
    // which must have the connection to itself): growing it would briefly hold two tables.
    let rows_in_table = parquet_rows(&connection, indexed)?;
    let mut statement = connection
        .prepare(&render_query(indexed, retry_of))
        .map_err(duck("render query"))?;
    let batches = statement.stream_arrow([]).map_err(duck("render query"))?;
    let mut cutter = ShardCutter {
        limits,
        cache,
        sink,
        stats: RenderStats::default(),
        shard: OpenShard::default(),
        first_with_body: std::collections::HashMap::with_capacity(
            usize::try_from(rows_in_table).unwrap_or(0),
        ),
    };
    let (mut scratch, mut escaped, mut line) = (String::new(), Vec::new(), Vec::new());
    for batch in batches {
        let (row_indexes, cells) = batch_columns(&batch)?;
        for row in 0..batch.num_rows() {
            cutter.stats.rows += 1;
            let row_index = row_indexes.value(row);
            let cell = |column: usize| -> Option<&str> { cells[column].get(row) };
            template
                .check_cells(&cell, limits.max_cell_bytes)
                .map_err(|message| TableError::Cell { row_index, message })?;
            line.clear();
            match template.render(row_index, cell, &mut scratch, &mut escaped, &mut line) {
                Some(body_hash) => cutter.take(row_index, &line, body_hash)?,
                None => cutter.stats.skipped += 1,
            }
        }
    }
    cutter.close()
}

/// The rows a render reads, in row order: all of them, or on a retry those that failed
/// retryably in `retry_of`. The indexed table is stored in row order and a scan keeps it
/// (preserve_insertion_order); only the semi-join of a retry needs sorting, and its rows are
/// few.
fn render_query(indexed: &Path, retry_of: Option<&[PathBuf]>) -> String {
    let (filter, order) = match retry_of {
        None => (String::new(), ""),
        Some([]) => (" WHERE false".to_owned(), ""),
        Some(files) => (
            format!(
                " WHERE {ROW_INDEX} IN (SELECT {ROW_INDEX} FROM read_parquet([{}]) \
                 WHERE NOT _ok AND _retryable)",
                files
                    .iter()
                    .map(|p| path_literal(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            " ORDER BY _row_index",
        ),
    };
    format!("SELECT * FROM {}{filter}{order}", indexed_relation(indexed))
}

/// Cuts rendered request lines into shards, in one sequential pass: a line repeating an
/// earlier row's request or answered by the result cache is not sent; a shard ends where the
/// next line would cross a limit.
struct ShardCutter<'a, S> {
    limits: ShardLimits,
    cache: Option<&'a CacheKeys>,
    sink: &'a mut S,
    stats: RenderStats,
    shard: OpenShard,
    first_with_body: std::collections::HashMap<u128, i64>,
}

impl<S: ShardSink> ShardCutter<'_, S> {
    /// Row `row_index`'s request `line`, whose body hashes to `body_hash`.
    #[inline]
    fn take(&mut self, row_index: i64, line: &[u8], body_hash: u128) -> Result<(), TableError> {
        // Pay once: a request identical to an earlier row's is not sent; the row takes that
        // row's answer.
        match self.first_with_body.entry(body_hash) {
            std::collections::hash_map::Entry::Occupied(first) => {
                self.stats.duplicates += 1;
                return self.sink.duplicate(row_index, *first.get());
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(row_index);
            }
        }
        // Pay once across jobs: an answer to this very request is in the cache.
        if self.cache.is_some_and(|keys| keys.contains(&body_hash)) {
            self.stats.cached += 1;
            return self.sink.cached(row_index, body_hash);
        }
        let (limits, bytes) = (self.limits, line.len() as u64);
        if bytes > limits.max_bytes {
            return Err(TableError::RowTooLarge {
                row_index,
                bytes: line.len(),
                limit: limits.max_bytes,
            });
        }
        let shard = &mut self.shard;
        if shard.requests >= limits.max_requests || shard.bytes + bytes > limits.max_bytes {
            self.sink
                .finish(shard.number, shard.requests, shard.bytes)?;
            *shard = OpenShard {
                number: shard.number + 1,
                ..OpenShard::default()
            };
        }
        self.sink.write_line(shard.number, line)?;
        shard.requests += 1;
        shard.bytes += bytes;
        self.stats.requests += 1;
        self.stats.bytes += bytes;
        Ok(())
    }

    /// Ends the last shard.
    fn close(mut self) -> Result<Rendered, TableError> {
        let shard = &self.shard;
        if shard.requests > 0 {
            self.stats.shards = shard.number + 1;
            self.sink
                .finish(shard.number, shard.requests, shard.bytes)?;
        }
        Ok(Rendered {
            stats: self.stats,
            first_with_body: self.first_with_body,
        })
    }
}

/// The two halves of a body hash as DuckDB UBIGINTs.
pub fn halves(hash: u128) -> (u64, u64) {
    ((hash >> 64) as u64, hash as u64)
}

/// Reads the body hashes of the result-cache segments `files`.
pub fn read_cache_keys(files: &[PathBuf], duckdb: &DuckdbLimits) -> Result<CacheKeys, TableError> {
    let mut keys = CacheKeys::new();
    if files.is_empty() {
        return Ok(keys);
    }
    let connection = connect(duckdb)?;
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
    duckdb: &DuckdbLimits,
) -> Result<(), TableError> {
    use std::io::Write;
    let csv = path.with_extension("csv");
    let io = TableError::writing(&csv);
    {
        let mut writer = std::io::BufWriter::new(std::fs::File::create(&csv).map_err(io)?);
        writeln!(writer, "{ROW_INDEX},h_hi,h_lo").map_err(io)?;
        for (hash, row) in first_with_body {
            let (hi, lo) = halves(*hash);
            writeln!(writer, "{row},{hi},{lo}").map_err(io)?;
        }
        writer.flush().map_err(io)?;
    }
    let connection = connect(duckdb)?;
    connection
        .execute_batch(&format!(
            "COPY (SELECT * FROM read_csv({}, header = true, columns = {{'{ROW_INDEX}': 'BIGINT', \
             'h_hi': 'UBIGINT', 'h_lo': 'UBIGINT'}})) TO {} (FORMAT parquet, {})",
            path_literal(&csv),
            path_literal(path),
            row_groups(duckdb, 24)
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
    duckdb: &DuckdbLimits,
) -> Result<u64, TableError> {
    let connection = connect(duckdb)?;
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
             USING (h_hi, h_lo)",
            columns.join(", "),
            path_literal(hits),
        ))
        .map_err(duck("read cached rows"))?;
    let row_bytes = average_row_bytes(&connection, "cached", fields)?;
    connection
        .execute_batch(&format!(
            "COPY cached TO {} (FORMAT parquet, {})",
            path_literal(out),
            row_groups(duckdb, row_bytes)
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
pub fn write_duplicates(
    path: &Path,
    pairs: &[(i64, i64)],
    duckdb: &DuckdbLimits,
) -> Result<(), TableError> {
    let connection = connect(duckdb)?;
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
            "COPY duplicates TO {} (FORMAT parquet, {})",
            path_literal(path),
            row_groups(duckdb, 16)
        ))
        .map_err(duck("write duplicates"))
}

/// Writes one shard attempt's merged rows as Parquet.
pub fn write_rows(
    path: &Path,
    fields: &[FieldSpec],
    attempt: u32,
    rows: &[RowResult],
    duckdb: &DuckdbLimits,
) -> Result<(), TableError> {
    let connection = connect(duckdb)?;
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
            "COPY results TO {} (FORMAT parquet, {})",
            path_literal(path),
            row_groups(duckdb, average_result_bytes(rows))
        ))
        .map_err(duck("write rows"))?;
    Ok(())
}

/// Bytes of a merged row on average: its texts and a string header for each.
fn average_result_bytes(rows: &[RowResult]) -> u64 {
    let text = |t: Option<&str>| 16 + t.map_or(0, str::len) as u64;
    let total: u64 = rows
        .iter()
        .map(|row| {
            let failure = row
                .failure
                .as_ref()
                .map_or(32, |f| text(Some(&f.reason)) + text(Some(&f.message)));
            24 + failure + row.values.iter().map(|v| text(v.as_deref())).sum::<u64>()
        })
        .sum();
    total / rows.len().max(1) as u64
}

/// Bytes of a row of `table` on average, counting the text of `fields` (the rest of a rows
/// table is a few fixed-size columns).
fn average_row_bytes(
    connection: &Connection,
    table: &str,
    fields: &[FieldSpec],
) -> Result<u64, TableError> {
    let mut text = vec!["64".to_owned()];
    for field in fields {
        text.push(format!("16 + coalesce(strlen({}), 0)", ident(&field.name)));
    }
    let bytes: Option<f64> = connection
        .query_row(
            &format!("SELECT avg({}) FROM {table}", text.join(" + ")),
            [],
            |r| r.get(0),
        )
        .map_err(duck("measure rows"))?;
    Ok(bytes.unwrap_or(0.0) as u64)
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
///
/// The input's rows are never sorted or joined: only their results are (one narrow row per
/// input row, in input order), and the outputs read both side by side (`POSITIONAL JOIN`),
/// streaming, so memory follows the widest row group, not the table.
#[allow(clippy::too_many_arguments)]
pub fn finalize(
    indexed: &Path,
    rows_files: &[PathBuf],
    duplicates: Option<&Path>,
    cached: Option<&Path>,
    hashes: Option<&Path>,
    fields: &[FieldSpec],
    outputs: &FinalOutputs,
    duckdb: &DuckdbLimits,
) -> Result<FinalCounts, TableError> {
    let connection = connect(duckdb)?;
    load_attempts(&connection, rows_files, cached, duplicates, fields)?;
    outcome_in_input_order(&connection, indexed)?;
    write_enriched(&connection, indexed, fields, outputs, duckdb)?;
    connection
        .execute_batch(&format!(
            "COPY (SELECT r._outcome_row AS {ROW_INDEX}, r._reason, r._message, r._attempts, \
             i.* EXCLUDE ({ROW_INDEX}) {SIDE_BY_SIDE} AND NOT r._ok) \
             TO {} (FORMAT csv, HEADER true)",
            path_literal(&outputs.failures_csv)
        ))
        .map_err(duck("write failures csv"))?;
    if let (Some(hashes), Some(segment)) = (hashes, &outputs.cache_segment) {
        write_cache_segment(&connection, hashes, segment, fields, outputs, duckdb)?;
    }
    let count = |sql: &str| -> Result<u64, TableError> {
        let n: i64 = connection
            .query_row(sql, [], |r| r.get(0))
            .map_err(duck("count"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok(FinalCounts {
        enriched_rows: count("SELECT count(*) FROM outcome WHERE _ok IS NULL OR _ok")?,
        failed_rows: count("SELECT count(*) FROM outcome WHERE NOT _ok")?,
    })
}

/// The input (`i`) and its outcome (`r`) read by position; a row out of place (checked on
/// `ROW_INDEX`, spelled out) stops the write.
const SIDE_BY_SIDE: &str = "FROM input i POSITIONAL JOIN outcome r WHERE \
    (i._row_index = r._outcome_row OR error('finalize: results out of step with the input rows'))";

/// Every attempt's result rows into table `attempts`: the sent attempts', the cached rows'
/// (attempt 0, before any sent one) and those of rows that repeated an earlier row's request
/// (that row's answers).
fn load_attempts(
    connection: &Connection,
    rows_files: &[PathBuf],
    cached: Option<&Path>,
    duplicates: Option<&Path>,
    fields: &[FieldSpec],
) -> Result<(), TableError> {
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
        connection
            .execute_batch(&format!(
                "INSERT INTO attempts BY NAME SELECT * FROM read_parquet({})",
                path_literal(cached)
            ))
            .map_err(duck("read cached rows"))?;
    }
    if let Some(duplicates) = duplicates {
        connection
            .execute_batch(&format!(
                "INSERT INTO attempts BY NAME SELECT d.{ROW_INDEX} AS {ROW_INDEX}, a.* EXCLUDE ({ROW_INDEX}) \
                 FROM read_parquet({}) d JOIN attempts a ON a.{ROW_INDEX} = d._first",
                path_literal(duplicates)
            ))
            .map_err(duck("read duplicates"))?;
    }
    Ok(())
}

/// View `input` over the indexed table, and table `outcome`: one row per input row, in input
/// order, with its latest attempt's result (none for a skipped row) and `_attempts`, how
/// often it was sent.
fn outcome_in_input_order(connection: &Connection, indexed: &Path) -> Result<(), TableError> {
    connection
        .execute_batch(&format!(
            "CREATE VIEW input AS SELECT * FROM {}",
            indexed_relation(indexed)
        ))
        .map_err(duck("read input"))?;
    connection
        .execute_batch(&format!(
            "CREATE TABLE results AS SELECT *, count(*) OVER (PARTITION BY {ROW_INDEX}) AS _attempts \
             FROM attempts \
             QUALIFY row_number() OVER (PARTITION BY {ROW_INDEX} ORDER BY _attempt DESC) = 1; \
             DROP TABLE attempts;"
        ))
        .map_err(duck("latest results"))?;
    // Separate statements: the window and this sort together do not fit where each alone
    // spills.
    connection
        .execute_batch(&format!(
            "CREATE TABLE outcome AS SELECT i.{ROW_INDEX} AS _outcome_row, r.* EXCLUDE ({ROW_INDEX}) \
             FROM (SELECT {ROW_INDEX} FROM input) i LEFT JOIN results r USING ({ROW_INDEX}) \
             ORDER BY i.{ROW_INDEX}; \
             DROP TABLE results;"
        ))
        .map_err(duck("results in input order"))?;
    Ok(())
}

/// The new columns as CSV writes them, as text. Generated text is untrusted (a row can steer
/// the model): with `formula_escape`, a cell a spreadsheet would run as a formula is prefixed
/// with `'`. Numbers (`-3`) are left alone.
fn csv_fields(fields: &[FieldSpec], formula_escape: bool) -> Vec<String> {
    fields
        .iter()
        .map(|f| {
            let column = format!("r.{}", ident(&f.name));
            match formula_escape && !matches!(f.field_type, FieldType::Number | FieldType::Boolean)
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
        .collect()
}

/// The new columns typed, as Parquet and JSON lines write them.
fn typed_fields(fields: &[FieldSpec]) -> Vec<String> {
    fields
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
        .collect()
}

/// Every row that did not fail, in input order, in each format asked for.
fn write_enriched(
    connection: &Connection,
    indexed: &Path,
    fields: &[FieldSpec],
    outputs: &FinalOutputs,
    duckdb: &DuckdbLimits,
) -> Result<(), TableError> {
    let row_bytes = parquet_row_bytes(connection, &path_literal(indexed))
        .map_err(duck("measure the input"))?
        + average_row_bytes(connection, "outcome", fields)?;
    let parquet = format!(
        "FORMAT parquet, COMPRESSION zstd, {}",
        row_groups(duckdb, row_bytes)
    );
    let text = csv_fields(fields, outputs.csv_formula_escape);
    let typed = typed_fields(fields);
    let formats = [
        (&outputs.enriched_csv, "FORMAT csv, HEADER true", &text),
        (&outputs.enriched_parquet, parquet.as_str(), &typed),
        (&outputs.enriched_jsonl, "FORMAT json", &typed),
    ];
    for (target, options, select_fields) in formats {
        let Some(path) = target else { continue };
        connection
            .execute_batch(&format!(
                "COPY (SELECT i.* EXCLUDE ({ROW_INDEX}), {} {SIDE_BY_SIDE} AND (r._ok IS NULL OR r._ok)) \
                 TO {} ({options})",
                select_fields.join(", "),
                path_literal(path)
            ))
            .map_err(duck("write enriched output"))?;
    }
    Ok(())
}

/// The answers this job paid for, by request body, for later jobs to reuse; not those of a
/// fallback attempt, which was sent as another request.
fn write_cache_segment(
    connection: &Connection,
    hashes: &Path,
    segment: &Path,
    fields: &[FieldSpec],
    outputs: &FinalOutputs,
    duckdb: &DuckdbLimits,
) -> Result<(), TableError> {
    let columns: Vec<String> = fields
        .iter()
        .map(|f| format!("r.{}", ident(&f.name)))
        .collect();
    connection
        .execute_batch(&format!(
            "COPY (SELECT h.h_hi, h.h_lo, {} FROM outcome r \
             JOIN read_parquet({}) h ON h.{ROW_INDEX} = r._outcome_row \
             WHERE r._ok AND r._attempt > 0 AND r._attempt <= {}) \
             TO {} (FORMAT parquet, COMPRESSION zstd, {})",
            columns.join(", "),
            path_literal(hashes),
            outputs.cache_last_attempt,
            path_literal(segment),
            row_groups(duckdb, average_row_bytes(connection, "outcome", fields)?)
        ))
        .map_err(duck("write cache segment"))?;
    Ok(())
}

/// Bytes of a row of a Parquet file (`path`, a SQL literal) on average, uncompressed and
/// with a string header per column (from its metadata).
fn parquet_row_bytes(connection: &Connection, path: &str) -> Result<u64, duckdb::Error> {
    let (bytes, columns, rows): (i64, i64, i64) = connection.query_row(
        &format!(
            "SELECT coalesce(sum(total_uncompressed_size), 0)::BIGINT, \
             count(DISTINCT column_id)::BIGINT, \
             (SELECT coalesce(sum(num_rows), 0)::BIGINT FROM parquet_file_metadata({path})) \
             FROM parquet_metadata({path})"
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(u64::try_from(bytes / rows.max(1) + 16 * columns).unwrap_or(0))
}

impl rowsmith_contract::step::Retryable for TableError {
    /// DuckDB may pass later (memory, a busy file); a table that is wrong stays wrong.
    fn is_retryable(&self) -> bool {
        matches!(self, TableError::Duckdb { .. })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_local_file_that_cannot_be_written_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gone").join("hashes.parquet");
        let hashes = std::collections::HashMap::from([(7u128, 0i64)]);
        let error = write_hashes(&path, &hashes, &DuckdbLimits::default())
            .expect_err("the directory does not exist");
        let text = error.to_string();
        assert!(
            text.contains(&path.with_extension("csv").display().to_string()),
            "{text}"
        );
        assert!(text.contains("No such file or directory"), "{text}");
    }

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
        let info =
            index_input(&input, &indexed, &Default::default(), &Default::default()).expect("index");
        assert_eq!(info.rows, rows);
        assert_eq!(info.columns, ["id", "zip", "price", "description"]);
        let connection = connect(&Default::default()).expect("connect");
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

    /// A CSV of `rows` news-like rows whose `body` is 5 to 20 KB of text (with commas, quotes
    /// and line breaks); returns its path and the byte length of each body.
    fn long_cell_table(dir: &Path, rows: usize) -> (PathBuf, Vec<usize>) {
        let path = dir.join("articles.csv");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
        writeln!(file, "id,headline,body").expect("write");
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut lengths = Vec::with_capacity(rows);
        for row in 0..rows {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let target = 5_000 + (seed % 15_000) as usize;
            let mut body = format!("Article {row}. ");
            let words = [
                "markets",
                "said",
                "\"quoted\"",
                "council,",
                "report",
                "\n",
                "années",
            ];
            let mut word = row;
            while body.len() < target {
                body.push_str(words[word % words.len()]);
                body.push(' ');
                word += 3;
            }
            lengths.push(body.len());
            writeln!(
                file,
                "{row},Headline {row},\"{}\"",
                body.replace('"', "\"\"")
            )
            .expect("write");
        }
        file.flush().expect("flush");
        (path, lengths)
    }

    /// 128 MiB and 2 threads: below what a default-sized Parquet row group of 5-20 KB cells
    /// takes (122,880 rows, here the whole table of ~50 MB, held per thread).
    const SMALL: DuckdbLimits = DuckdbLimits {
        memory_limit_bytes: 128 * 1024 * 1024,
        threads: 2,
    };

    #[test]
    fn long_cells_are_indexed_and_finalized_within_a_small_memory_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows = 4_000;
        let (input, lengths) = long_cell_table(dir.path(), rows);
        let indexed = dir.path().join("indexed.parquet");
        let info = index_input(&input, &indexed, &Default::default(), &SMALL).expect("index");
        assert_eq!(info.rows, rows as u64);
        assert_eq!(info.columns, ["id", "headline", "body"]);
        // Every tenth row failed, the others have an answer.
        let fields = vec![
            rowsmith_contract::spec::parse_field("summary:string").expect("field"),
            rowsmith_contract::spec::parse_field("words:number").expect("field"),
        ];
        let results: Vec<RowResult> = (0..rows as i64)
            .map(|row_index| match row_index % 10 {
                0 => RowResult {
                    row_index,
                    failure: Some(RowFailure {
                        reason: "refusal".into(),
                        message: format!("refused row {row_index}"),
                        retryable: false,
                    }),
                    values: vec![None, None],
                },
                _ => RowResult {
                    row_index,
                    failure: None,
                    values: vec![
                        Some(format!("summary of article {row_index}")),
                        Some(lengths[row_index as usize].to_string()),
                    ],
                },
            })
            .collect();
        let rows_file = dir.path().join("rows.parquet");
        write_rows(&rows_file, &fields, 1, &results, &SMALL).expect("rows");
        let outputs = FinalOutputs {
            enriched_csv: Some(dir.path().join("enriched.csv")),
            enriched_parquet: Some(dir.path().join("enriched.parquet")),
            enriched_jsonl: None,
            failures_csv: dir.path().join("failures.csv"),
            csv_formula_escape: true,
            cache_segment: None,
            cache_last_attempt: u32::MAX,
        };
        let counts = finalize(
            &indexed,
            &[rows_file],
            None,
            None,
            None,
            &fields,
            &outputs,
            &SMALL,
        )
        .expect("finalize");
        let failed = rows as u64 / 10;
        assert_eq!(
            counts,
            FinalCounts {
                enriched_rows: rows as u64 - failed,
                failed_rows: failed
            }
        );
        // Read back the way a user would: every answered row in input order, its body intact.
        let mut reader = csv::Reader::from_path(outputs.enriched_csv.as_ref().expect("csv"))
            .expect("enriched.csv");
        assert_eq!(
            reader.headers().expect("header"),
            vec!["id", "headline", "body", "summary", "words"]
        );
        let expected: Vec<usize> = (0..rows).filter(|row| row % 10 != 0).collect();
        let mut seen = 0;
        for (record, row) in reader.records().zip(&expected) {
            let record = record.expect("record");
            assert_eq!(&record[0], row.to_string());
            assert_eq!(record[2].len(), lengths[*row], "body of row {row}");
            assert!(record[2].starts_with(&format!("Article {row}. ")));
            assert_eq!(&record[3], format!("summary of article {row}"));
            seen += 1;
        }
        assert_eq!(seen, expected.len());
        let connection = connect(&SMALL).expect("connect");
        let (parquet_rows, misplaced, words): (i64, i64, f64) = connection
            .query_row(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE summary <> 'summary of article ' || id), \
                     sum(words) FROM read_parquet({})",
                    path_literal(outputs.enriched_parquet.as_ref().expect("parquet"))
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("parquet");
        assert_eq!((parquet_rows, misplaced), (expected.len() as i64, 0));
        let expected_words: usize = expected.iter().map(|row| lengths[*row]).sum();
        assert_eq!(words as usize, expected_words);
        let failures: Vec<(String, String)> = csv::Reader::from_path(&outputs.failures_csv)
            .expect("failures.csv")
            .records()
            .map(|r| {
                let r = r.expect("record");
                (r[0].to_owned(), r[1].to_owned())
            })
            .collect();
        let expected_failures: Vec<(String, String)> = (0..rows)
            .step_by(10)
            .map(|row| (row.to_string(), "refusal".to_owned()))
            .collect();
        assert_eq!(failures, expected_failures);
    }

    #[test]
    fn running_out_of_memory_names_the_setting_to_raise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (input, _) = long_cell_table(dir.path(), 50);
        // Less than one CSV read buffer.
        let tiny = DuckdbLimits {
            memory_limit_bytes: 4 * 1024 * 1024,
            threads: 1,
        };
        let error = index_input(
            &input,
            &dir.path().join("indexed.parquet"),
            &Default::default(),
            &tiny,
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, TableError::OutOfMemory { .. }), "{message}");
        assert!(
            message.contains("raise duckdb.memory_limit (ROWSMITH_DUCKDB__MEMORY_LIMIT"),
            "{message}"
        );
        assert!(!message.contains("keep only the columns"), "{message}");
    }

    #[test]
    fn row_groups_are_bounded_in_bytes_whatever_the_row_width() {
        for limits in [
            SMALL,
            DuckdbLimits {
                memory_limit_bytes: 512 << 20,
                threads: 8,
            },
        ] {
            let per_thread = limits.memory_limit_bytes / limits.threads as u64;
            for row_bytes in [40, 300, 6_500, 20_000, 1 << 20] {
                let rows = row_group_rows(&limits, row_bytes);
                assert!(
                    rows * row_bytes <= per_thread / 8 || rows == 64,
                    "{rows} rows of {row_bytes} bytes under {limits:?}"
                );
                assert!((64..=122_880).contains(&rows));
            }
        }
        // Narrow rows keep DuckDB's default.
        assert_eq!(row_group_rows(&SMALL, 40), 122_880);
    }

    #[test]
    fn a_csv_head_gives_the_average_width_of_its_rows() {
        let head = b"id,body\n1,\"ab\ncd\"\n2,efgh\n3,ij";
        // Rows of 10, 7 and 4 bytes; when the head is cut, the last one does not count.
        assert_eq!(head_row_bytes(head, b',', true), 8);
        assert_eq!(head_row_bytes(head, b',', false), 7);
    }

    #[test]
    fn each_connection_spills_to_its_own_directory() {
        let first = connect(&SMALL).expect("connect");
        let second = connect(&SMALL).expect("connect");
        let directory = |db: &Db| -> String {
            db.query_row("SELECT current_setting('temp_directory')", [], |r| r.get(0))
                .expect("setting")
        };
        let (first_dir, second_dir) = (directory(&first), directory(&second));
        assert_ne!(first_dir, second_dir);
        assert!(Path::new(&first_dir).is_dir());
        let memory: String = first
            .query_row("SELECT current_setting('memory_limit')", [], |r| r.get(0))
            .expect("setting");
        assert_eq!(memory, "128.0 MiB");
        drop(first);
        assert!(
            !Path::new(&first_dir).exists(),
            "removed with its connection"
        );
        assert!(Path::new(&second_dir).is_dir());
    }

    #[test]
    fn gzipped_csv_and_jsonl_inputs_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gz = dir.path().join("in.csv.gz");
        let connection = connect(&Default::default()).expect("connect");
        connection
            .execute_batch(&format!(
                "COPY (SELECT '00' || i AS zip, 'text ' || i AS description FROM range(5) t(i)) TO {} (FORMAT csv, HEADER true, COMPRESSION gzip)",
                path_literal(&gz)
            ))
            .expect("write gz");
        let info = index_input(
            &gz,
            &dir.path().join("a.parquet"),
            &Default::default(),
            &Default::default(),
        )
        .expect("index gz");
        assert_eq!(
            (info.rows, info.columns.clone()),
            (5, vec!["zip".to_owned(), "description".to_owned()])
        );
        let jsonl = dir.path().join("in.jsonl");
        std::fs::write(&jsonl, "{\"sku\":\"00501\",\"description\":\"a ball\"}\n{\"sku\":\"00502\",\"description\":null}\n")
            .expect("write jsonl");
        let info = index_input(
            &jsonl,
            &dir.path().join("b.parquet"),
            &Default::default(),
            &Default::default(),
        )
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
        let error = index_input(
            &jsonl,
            &dir.path().join("o.parquet"),
            &limits,
            &Default::default(),
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("more than limits.max_input_bytes (100)"),
            "{error}"
        );
        let csv = dir.path().join("big.csv");
        std::fs::write(&csv, format!("sku,description\n{}", "1,abc\n".repeat(50))).expect("write");
        let error = index_input(
            &csv,
            &dir.path().join("p.parquet"),
            &limits,
            &Default::default(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("limits.max_input_bytes"),
            "{error}"
        );
    }
}
