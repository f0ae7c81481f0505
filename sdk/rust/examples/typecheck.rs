//! typecheck: a schema plugin (plugin ABI v1, guests/plugins/wasmshare_plugin.h and
//! docs/plugins.md) that type-checks an infrastructure program against a provider schema
//! blob read in place: the Rust twin of guests/plugins/typecheck.c, with the same status
//! codes, the same diagnostics in the same order with the same paths, the same truncation
//! of the output buffer and the same limits (`MAX_DEPTH`, `MAX_PATH`).
//!
//! * `plugin_init(blob, len)`: checks the blob's header and table bounds and keeps the
//!   blob for the life of the instance; `(0, 0)` means no schema (every type unknown).
//! * `plugin_check(prog, len, out, cap)`: a diagnostic for every unknown resource type,
//!   unknown property and value of the wrong type, each with its path
//!   (`resources.NAME.properties.a.b[2].c`); returns how many were found.
//!
//! The blob and the program are untrusted. The raw `(pointer, length)` pairs become
//! slices once, at the exported functions; everything else is safe Rust with checked
//! reads and checked arithmetic, so a bad offset gives the C plugin's error code
//! (`WSP_ERR_BAD_BOUNDS`, ...), never a panic (which would trap). Lookups: binary
//! search of the sorted type table, then a scan of the type's property list. No
//! allocation: the path is built in a fixed static buffer.
//!
//! Where the host breaks the ABI's pointer contract, this twin refuses with
//! `WSP_ERR_BAD_BOUNDS` instead of doing what the C plugin does (read or write whatever
//! lies there, or trap): a null pointer with a non-zero length, `out` overlapping the
//! program or the blob, or a range past the end of linear memory (it is cut at the end
//! of memory, and at 2 GiB, the largest slice wasm32 Rust can form).
#![no_std]

use core::cmp::Ordering;
use core::ptr::{addr_of, addr_of_mut};

wasmshare_guest::abi_version!();

const WSP_ABI_VERSION: i32 = 1;

const WSP_OK: i32 = 0;
const WSP_ERR_BAD_MAGIC: i32 = -101;
const WSP_ERR_BAD_VERSION: i32 = -102;
const WSP_ERR_BAD_BOUNDS: i32 = -103;
const WSP_ERR_NOT_READY: i32 = -104;
const WSP_ERR_BAD_PROGRAM: i32 = -105;
const WSP_ERR_TOO_DEEP: i32 = -106;

const BLOB_MAGIC: &[u8; 8] = b"WSSCHEMA";
const BLOB_VERSION: u32 = 1;
const BLOB_HEADER_SIZE: u64 = 64;
const INDEX_HEADER_SIZE: u64 = 32;
const TYPE_SIZE: u64 = 32;
const PROP_SIZE: u64 = 16;

const T_STRING: u8 = 1;
const T_NUMBER: u8 = 2;
const T_INTEGER: u8 = 3;
const T_BOOLEAN: u8 = 4;
const T_ARRAY: u8 = 5;
const T_MAP: u8 = 6;
const T_OBJECT: u8 = 7;
const T_ANY: u8 = 8;
const NO_REF: u32 = 0xFFFF_FFFF;

const PROGRAM_MAGIC: u32 = 0x4750_5357; // "WSPG"
const PROGRAM_VERSION: u32 = 1;
const PROGRAM_HEADER_SIZE: u64 = 24;
const RESOURCE_SIZE: u64 = 20;
const NODE_SIZE: u64 = 20;

const V_NULL: u8 = 0;
const V_BOOL: u8 = 1;
const V_INTEGER: u8 = 2;
const V_NUMBER: u8 = 3;
const V_STRING: u8 = 4;
const V_EXPR: u8 = 5;
const V_LIST: u8 = 6;
const V_MAP: u8 = 7;

const DIAG_UNKNOWN_TYPE: u8 = 1;
const DIAG_UNKNOWN_PROPERTY: u8 = 2;
const DIAG_WRONG_TYPE: u8 = 3;
const OUT_HEADER_SIZE: u32 = 16;

const MAX_DEPTH: i32 = 48;
const MAX_PATH: usize = 4096;

// ---- bounds-checked little-endian reads ------------------------------------------------

/// `[off, off + len)` inside `[0, size)`? (no overflow)
fn in_bounds(off: u64, len: u64, size: u64) -> bool {
    off <= size && len <= size - off
}

/// `b[off .. off + len]`, or None when it is not inside `b`.
fn sub(b: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    if !in_bounds(off, len, b.len() as u64) {
        return None;
    }
    b.get(usize::try_from(off).ok()?..usize::try_from(off + len).ok()?)
}

fn rd16(b: &[u8], off: u64) -> Option<u16> {
    Some(u16::from_le_bytes(<[u8; 2]>::try_from(sub(b, off, 2)?).ok()?))
}

fn rd32(b: &[u8], off: u64) -> Option<u32> {
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(sub(b, off, 4)?).ok()?))
}

fn rd64(b: &[u8], off: u64) -> Option<u64> {
    Some(u64::from_le_bytes(<[u8; 8]>::try_from(sub(b, off, 8)?).ok()?))
}

// ---- the schema (set by plugin_init) ---------------------------------------------------

/// A property record of the blob: its type, element type and nested type.
#[derive(Clone, Copy)]
struct Prop {
    kind: u8,
    item_kind: u8,
    nested: u32,
}

/// The blob's tables, as validated by plugin_init.
#[derive(Clone, Copy)]
struct Schema {
    ready: bool,
    /// The whole blob, kept for the life of the instance (as the C plugin keeps its pointer).
    blob: &'static [u8],
    types: &'static [u8],   // n_types * 32 bytes
    props: &'static [u8],   // n_props * 16 bytes
    strings: &'static [u8], // strings_size bytes
    n_types: u32,
    n_resources: u32,
    n_props: u32,
}

impl Schema {
    const NONE: Schema = Schema {
        ready: false,
        blob: &[],
        types: &[],
        props: &[],
        strings: &[],
        n_types: 0,
        n_resources: 0,
        n_props: 0,
    };

    /// Validates the blob's header and table bounds (the C plugin's checks, in its order).
    fn parse(blob: &'static [u8]) -> Result<Schema, i32> {
        let len = blob.len() as u64;
        if len < BLOB_HEADER_SIZE {
            return Err(WSP_ERR_BAD_BOUNDS);
        }
        if blob.get(..8) != Some(&BLOB_MAGIC[..]) {
            return Err(WSP_ERR_BAD_MAGIC);
        }
        let field32 = |off: u64| rd32(blob, off).ok_or(WSP_ERR_BAD_BOUNDS);
        let field64 = |off: u64| rd64(blob, off).ok_or(WSP_ERR_BAD_BOUNDS);
        if field32(8)? != BLOB_VERSION {
            return Err(WSP_ERR_BAD_VERSION);
        }
        let header_size = u64::from(field32(12)?);
        let blob_size = field64(16)?;
        let (index_off, index_size) = (field64(24)?, field64(32)?);
        let (json_off, json_size) = (field64(40)?, field64(48)?);
        if header_size < BLOB_HEADER_SIZE
            || blob_size > len
            || header_size > blob_size
            || !in_bounds(index_off, index_size, blob_size)
            || !in_bounds(json_off, json_size, blob_size)
            || index_size < INDEX_HEADER_SIZE
        {
            return Err(WSP_ERR_BAD_BOUNDS);
        }
        let index = sub(blob, index_off, index_size).ok_or(WSP_ERR_BAD_BOUNDS)?;
        let word = |i: u64| rd32(index, 4 * i).ok_or(WSP_ERR_BAD_BOUNDS);
        let (n_types, types_off) = (word(0)?, word(1)?);
        let (n_props, props_off) = (word(2)?, word(3)?);
        let (strings_off, strings_size) = (word(4)?, word(5)?);
        let n_resources = word(6)?;
        let types_len = u64::from(n_types) * TYPE_SIZE;
        let props_len = u64::from(n_props) * PROP_SIZE;
        if !in_bounds(u64::from(types_off), types_len, index_size)
            || !in_bounds(u64::from(props_off), props_len, index_size)
            || !in_bounds(u64::from(strings_off), u64::from(strings_size), index_size)
            || n_resources > n_types
        {
            return Err(WSP_ERR_BAD_BOUNDS);
        }
        let table = |off: u32, len: u64| sub(index, u64::from(off), len).ok_or(WSP_ERR_BAD_BOUNDS);
        Ok(Schema {
            ready: true,
            blob,
            types: table(types_off, types_len)?,
            props: table(props_off, props_len)?,
            strings: table(strings_off, u64::from(strings_size))?,
            n_types,
            n_resources,
            n_props,
        })
    }

    /// Compares the string at (off, len) of the string table with `s`; Err when the
    /// table entry is out of bounds.
    fn cmp_name(&self, off: u32, len: u32, s: &[u8]) -> Result<Ordering, i32> {
        let name = sub(self.strings, u64::from(off), u64::from(len)).ok_or(WSP_ERR_BAD_BOUNDS)?;
        Ok(name.cmp(s)) // bytes in order, then the shorter first: the C plugin's order
    }

    /// The type record `i` (32 bytes).
    fn type_record(&self, i: u32) -> Result<&'static [u8], i32> {
        sub(self.types, u64::from(i) * TYPE_SIZE, TYPE_SIZE).ok_or(WSP_ERR_BAD_BOUNDS)
    }

    /// Index of the resource type named `s` in `[0, n_resources)`, or None.
    fn find_resource(&self, s: &[u8]) -> Result<Option<u32>, i32> {
        let (mut lo, mut hi) = (0u32, self.n_resources);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let t = self.type_record(mid)?;
            let name_off = rd32(t, 0).ok_or(WSP_ERR_BAD_BOUNDS)?;
            let name_len = rd32(t, 4).ok_or(WSP_ERR_BAD_BOUNDS)?;
            match self.cmp_name(name_off, name_len, s)? {
                Ordering::Equal => return Ok(Some(mid)),
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// The property named `s` of type `ty`, or None.
    fn find_prop(&self, ty: u32, s: &[u8]) -> Result<Option<Prop>, i32> {
        if ty >= self.n_types {
            return Err(WSP_ERR_BAD_BOUNDS);
        }
        let t = self.type_record(ty)?;
        let first = rd32(t, 8).ok_or(WSP_ERR_BAD_BOUNDS)?;
        let count = rd32(t, 12).ok_or(WSP_ERR_BAD_BOUNDS)?;
        if !in_bounds(u64::from(first), u64::from(count), u64::from(self.n_props)) {
            return Err(WSP_ERR_BAD_BOUNDS);
        }
        for i in 0..count {
            let at = (u64::from(first) + u64::from(i)) * PROP_SIZE;
            let p = sub(self.props, at, PROP_SIZE).ok_or(WSP_ERR_BAD_BOUNDS)?;
            let name_off = rd32(p, 0).ok_or(WSP_ERR_BAD_BOUNDS)?;
            let name_len = rd16(p, 4).ok_or(WSP_ERR_BAD_BOUNDS)?;
            if self.cmp_name(name_off, u32::from(name_len), s)? == Ordering::Equal {
                return Ok(Some(Prop {
                    kind: p.get(6).copied().unwrap_or(0),
                    item_kind: p.get(7).copied().unwrap_or(0),
                    nested: rd32(p, 8).ok_or(WSP_ERR_BAD_BOUNDS)?,
                }));
            }
        }
        Ok(None)
    }
}

static mut SCHEMA: Schema = Schema::NONE;
static mut PATH: [u8; MAX_PATH] = [0; MAX_PATH];

// ---- the program and the output --------------------------------------------------------

/// A node of the program (20 bytes).
#[derive(Clone, Copy)]
struct Node {
    kind: u8,
    key_off: u32,
    key_len: u32,
    first_child: u32,
    n_children: u32,
}

/// One check: the program's tables, the output buffer and the path being built.
struct Check<'a> {
    schema: Schema,
    nodes: &'a [u8],
    n_nodes: u32,
    strings: &'a [u8],
    out: &'a mut [u8],
    out_used: u32,
    n_written: u32,
    n_total: u32,
    resource: u32,
    path: &'a mut [u8; MAX_PATH],
    path_len: u32,
}

impl<'a> Check<'a> {
    fn push_bytes(&mut self, s: &[u8]) -> Result<(), i32> {
        let used = self.path_len as usize;
        if s.len() > MAX_PATH.saturating_sub(used) {
            return Err(WSP_ERR_TOO_DEEP);
        }
        let dst = self.path.get_mut(used..used + s.len()).ok_or(WSP_ERR_TOO_DEEP)?;
        for (d, c) in dst.iter_mut().zip(s) {
            *d = *c;
        }
        self.path_len += s.len() as u32;
        Ok(())
    }

    /// Appends `.KEY` for the key at (off, len) of the program's strings; returns the key.
    fn push_key(&mut self, off: u32, len: u32) -> Result<&'a [u8], i32> {
        let strings: &'a [u8] = self.strings;
        let key = sub(strings, u64::from(off), u64::from(len)).ok_or(WSP_ERR_BAD_BOUNDS)?;
        self.push_bytes(b".")?;
        self.push_bytes(key)?;
        Ok(key)
    }

    /// Appends `[i]`.
    fn push_index(&mut self, i: u32) -> Result<(), i32> {
        let mut digits = [0u8; 10]; // u32::MAX has 10
        let mut n = 0;
        let mut rest = i;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            n += 1;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let digits = digits.get(digits.len() - n..).unwrap_or(&[]);
        let mut text = [0u8; 12];
        let bytes = Some(b'[').into_iter().chain(digits.iter().copied()).chain(Some(b']'));
        for (slot, b) in text.iter_mut().zip(bytes) {
            *slot = b;
        }
        self.push_bytes(text.get(..n + 2).unwrap_or(&[]))
    }

    /// Counts a diagnostic and writes it when it fits (else the host sees n_total > n_written).
    fn diag(&mut self, kind: u8, expected: u8, actual: u8) {
        self.n_total = self.n_total.wrapping_add(1);
        let need = (12 + self.path_len + 3) & !3;
        let cap = self.out.len() as u32;
        if self.out_used > cap || need > cap - self.out_used {
            return;
        }
        let start = self.out_used as usize;
        let record = match self.out.get_mut(start..start + need as usize) {
            Some(record) => record,
            None => return,
        };
        let r = self.resource.to_le_bytes();
        let l = self.path_len.to_le_bytes();
        let head = [kind, expected, actual, 0, r[0], r[1], r[2], r[3], l[0], l[1], l[2], l[3]];
        let path = self.path.get(..self.path_len as usize).unwrap_or(&[]);
        let bytes = head.iter().chain(path).copied().chain(core::iter::repeat(0));
        for (d, b) in record.iter_mut().zip(bytes) {
            *d = b;
        }
        self.out_used += need;
        self.n_written += 1;
    }

    /// The node `i`; WSP_ERR_BAD_PROGRAM when it is not in the node table.
    fn node(&self, i: u32) -> Result<Node, i32> {
        if i >= self.n_nodes {
            return Err(WSP_ERR_BAD_PROGRAM);
        }
        let p = sub(self.nodes, u64::from(i) * NODE_SIZE, NODE_SIZE).ok_or(WSP_ERR_BAD_PROGRAM)?;
        let word = |off: u64| rd32(p, off).ok_or(WSP_ERR_BAD_PROGRAM);
        Ok(Node {
            kind: p.first().copied().unwrap_or(V_NULL),
            key_off: word(4)?,
            key_len: word(8)?,
            first_child: word(12)?,
            n_children: word(16)?,
        })
    }

    /// Children `[first, first + n)` of `node`: after it, and inside the node table.
    fn children(&self, node: u32) -> Result<(u32, u32), i32> {
        let p = self.node(node)?;
        let (first, n) = (p.first_child, p.n_children);
        if n == 0 {
            return Ok((first, 0));
        }
        if first <= node || !in_bounds(u64::from(first), u64::from(n), u64::from(self.n_nodes)) {
            return Err(WSP_ERR_BAD_PROGRAM);
        }
        Ok((first, n))
    }

    /// The entries of map node `node` against the properties of object type `ty`.
    fn check_object(&mut self, node: u32, ty: u32, depth: i32) -> Result<(), i32> {
        let (first, n) = self.children(node)?;
        for i in 0..n {
            let child = first.checked_add(i).ok_or(WSP_ERR_BAD_PROGRAM)?;
            let c = self.node(child)?;
            let saved = self.path_len;
            let key = self.push_key(c.key_off, c.key_len)?;
            match self.schema.find_prop(ty, key)? {
                None => self.diag(DIAG_UNKNOWN_PROPERTY, 0, 0),
                Some(p) => self.check_value(child, p.kind, p.item_kind, p.nested, depth + 1)?,
            }
            self.path_len = saved;
        }
        Ok(())
    }

    fn check_value(
        &mut self,
        node: u32,
        kind: u8,
        item_kind: u8,
        nested: u32,
        depth: i32,
    ) -> Result<(), i32> {
        if depth > MAX_DEPTH {
            return Err(WSP_ERR_TOO_DEEP);
        }
        let v = self.node(node)?.kind;
        if v == V_NULL || v == V_EXPR || kind == T_ANY {
            return Ok(()); // unset, or only known when the program runs
        }
        let ok = match kind {
            T_STRING => v == V_STRING,
            T_NUMBER => v == V_NUMBER || v == V_INTEGER,
            T_INTEGER => v == V_INTEGER,
            T_BOOLEAN => v == V_BOOL,
            T_ARRAY => v == V_LIST,
            T_MAP | T_OBJECT => v == V_MAP,
            _ => true, // a type this guest does not know: accept
        };
        if !ok {
            self.diag(DIAG_WRONG_TYPE, kind, v);
            return Ok(());
        }
        if kind == T_OBJECT {
            if nested != NO_REF {
                self.check_object(node, nested, depth)?;
            }
            return Ok(());
        }
        if kind != T_ARRAY && kind != T_MAP {
            return Ok(());
        }
        let elem = match item_kind {
            T_ARRAY | T_MAP | 0 => T_ANY, // nested collections are not described further
            other => other,
        };
        let (first, n) = self.children(node)?;
        for i in 0..n {
            let child = first.checked_add(i).ok_or(WSP_ERR_BAD_PROGRAM)?;
            let saved = self.path_len;
            if kind == T_ARRAY {
                self.push_index(i)?;
            } else {
                let c = self.node(child)?;
                self.push_key(c.key_off, c.key_len)?;
            }
            self.check_value(child, elem, 0, nested, depth + 1)?;
            self.path_len = saved;
        }
        Ok(())
    }
}

/// Type-checks the encoded program `prog`, writing the diagnostics into `out`.
fn check(schema: Schema, prog: &[u8], out: &mut [u8], path: &mut [u8; MAX_PATH]) -> Result<i32, i32> {
    let len = prog.len() as u64;
    if (out.len() as u64) < u64::from(OUT_HEADER_SIZE) || len < PROGRAM_HEADER_SIZE {
        return Err(WSP_ERR_BAD_BOUNDS);
    }
    let header = |i: u64| rd32(prog, 4 * i).ok_or(WSP_ERR_BAD_BOUNDS);
    if header(0)? != PROGRAM_MAGIC {
        return Err(WSP_ERR_BAD_MAGIC);
    }
    if header(1)? != PROGRAM_VERSION {
        return Err(WSP_ERR_BAD_VERSION);
    }
    let (n_res, n_nodes, strings_size) = (header(2)?, header(3)?, header(4)?);
    let res_off = PROGRAM_HEADER_SIZE;
    let nodes_off = res_off + u64::from(n_res) * RESOURCE_SIZE;
    let strings_off = nodes_off + u64::from(n_nodes) * NODE_SIZE;
    if !in_bounds(strings_off, u64::from(strings_size), len) {
        return Err(WSP_ERR_BAD_BOUNDS);
    }
    let nodes = sub(prog, nodes_off, strings_off - nodes_off).ok_or(WSP_ERR_BAD_BOUNDS)?;
    let strings = sub(prog, strings_off, u64::from(strings_size)).ok_or(WSP_ERR_BAD_BOUNDS)?;
    let mut c = Check {
        schema,
        nodes,
        n_nodes,
        strings,
        out,
        out_used: OUT_HEADER_SIZE,
        n_written: 0,
        n_total: 0,
        resource: 0,
        path,
        path_len: 0,
    };
    for r in 0..n_res {
        let res =
            sub(prog, res_off + u64::from(r) * RESOURCE_SIZE, RESOURCE_SIZE).ok_or(WSP_ERR_BAD_BOUNDS)?;
        let word = |i: u64| rd32(res, 4 * i).ok_or(WSP_ERR_BAD_BOUNDS);
        let (name_off, name_len) = (word(0)?, word(1)?);
        let (type_off, type_len, props) = (word(2)?, word(3)?, word(4)?);
        let size = u64::from(strings_size);
        if !in_bounds(u64::from(name_off), u64::from(name_len), size)
            || !in_bounds(u64::from(type_off), u64::from(type_len), size)
        {
            return Err(WSP_ERR_BAD_BOUNDS);
        }
        c.resource = r;
        c.path_len = 0;
        c.push_bytes(b"resources")?;
        c.push_key(name_off, name_len)?;
        let base = c.path_len;
        let token = sub(strings, u64::from(type_off), u64::from(type_len)).ok_or(WSP_ERR_BAD_BOUNDS)?;
        let ty = match schema.find_resource(token)? {
            Some(ty) => ty,
            None => {
                c.push_bytes(b".type")?;
                c.diag(DIAG_UNKNOWN_TYPE, 0, 0);
                continue;
            }
        };
        if props == NO_REF {
            continue;
        }
        c.path_len = base;
        c.push_bytes(b".properties")?;
        let v = c.node(props)?.kind;
        if v == V_NULL || v == V_EXPR {
            continue;
        }
        if v != V_MAP {
            c.diag(DIAG_WRONG_TYPE, T_OBJECT, v);
            continue;
        }
        c.check_object(props, ty, 0)?;
    }
    let header = [c.n_written, c.n_total, c.out_used, 0].into_iter().flat_map(u32::to_le_bytes);
    for (d, b) in c.out.iter_mut().zip(header) {
        *d = b;
    }
    Ok(c.n_total as i32)
}

// ---- the boundary: raw (pointer, length) pairs become slices here, once ----------------

/// Bytes of linear memory from `ptr` to its end (or 2 GiB, the largest wasm32 slice).
fn addressable(ptr: usize, len: u32) -> usize {
    #[cfg(target_arch = "wasm32")]
    let memory = core::arch::wasm32::memory_size::<0>() as u64 * 65536;
    #[cfg(not(target_arch = "wasm32"))]
    let memory = u64::MAX;
    let n = u64::from(len)
        .min(memory.saturating_sub(ptr as u64))
        .min(isize::MAX as u64)
        .min((usize::MAX - ptr) as u64);
    n as usize
}

/// `(ptr, len)` as the memory range `[start, end)` it covers, or None for a null
/// pointer with bytes (`(null, 0)` is empty).
fn range(ptr: usize, len: u32) -> Option<(usize, usize)> {
    if len == 0 {
        return Some((ptr, ptr));
    }
    if ptr == 0 {
        return None;
    }
    Some((ptr, ptr + addressable(ptr, len)))
}

/// Do two memory ranges share a byte?
fn overlap(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

/// The plugin ABI this module implements (`WSP_ABI_VERSION`).
#[no_mangle]
pub unsafe extern "C" fn plugin_abi_version() -> i32 {
    WSP_ABI_VERSION
}

/// Validates the blob's header and bounds and keeps the blob; `(0, 0)`: no schema.
///
/// # Safety
/// `blob` must point to `len` bytes that stay readable, unchanged, for the life of the
/// instance (the host lends them read-only), or be null with `len` 0.
#[no_mangle]
pub unsafe extern "C" fn plugin_init(blob: *const u8, len: u32) -> i32 {
    let schema = addr_of_mut!(SCHEMA);
    *schema = Schema::NONE;
    if blob.is_null() && len == 0 {
        // no schema at all
        (*schema).ready = true;
        return WSP_OK;
    }
    let (start, end) = match range(blob as usize, len) {
        Some(r) => r,
        None => return WSP_ERR_BAD_BOUNDS,
    };
    let bytes: &'static [u8] = if start == end {
        &[]
    } else {
        // SAFETY: a non-null range inside linear memory, read-only for the instance's life.
        core::slice::from_raw_parts(blob, end - start)
    };
    match Schema::parse(bytes) {
        Ok(parsed) => {
            *schema = parsed;
            WSP_OK
        }
        Err(code) => code,
    }
}

/// Type-checks the encoded program `prog[0..len)`, diagnostics into `out[0..cap)`.
///
/// # Safety
/// `prog` must point to `len` readable bytes and `out` to `cap` writable ones (the host's
/// query region), neither of which anything else touches during the call.
#[no_mangle]
pub unsafe extern "C" fn plugin_check(prog: *const u8, len: u32, out: *mut u8, cap: u32) -> i32 {
    let schema = *addr_of!(SCHEMA);
    if !schema.ready {
        return WSP_ERR_NOT_READY;
    }
    let (p, o) = match (range(prog as usize, len), range(out as usize, cap)) {
        (Some(p), Some(o)) => (p, o),
        _ => return WSP_ERR_BAD_BOUNDS,
    };
    let b = (schema.blob.as_ptr() as usize, schema.blob.as_ptr() as usize + schema.blob.len());
    if overlap(o, p) || overlap(o, b) {
        return WSP_ERR_BAD_BOUNDS;
    }
    // SAFETY: non-null ranges inside linear memory; `out` overlaps neither the program
    // nor the blob, and the path buffer is ours (one call at a time per instance).
    let prog: &[u8] = if p.0 == p.1 { &[] } else { core::slice::from_raw_parts(prog, p.1 - p.0) };
    let out: &mut [u8] = if o.0 == o.1 { &mut [] } else { core::slice::from_raw_parts_mut(out, o.1 - o.0) };
    let path = &mut *addr_of_mut!(PATH);
    match check(schema, prog, out, path) {
        Ok(n) => n,
        Err(code) => code,
    }
}
