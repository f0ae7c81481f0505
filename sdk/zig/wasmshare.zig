//! wasmshare guests in Zig: the memory a host lends into this guest, as slices.
//!
//! The host maps shared memory *into* this guest's linear memory and passes a (pointer,
//! length) window; this module gives each window back as the slice it is: `[]u32` for the
//! mask row, `[]f32` for the bias row, `[]const u32` for the sampled tokens, `[]const u8`
//! for the argument, and the token table as a bounds-checked view with an iterator.
//! Nothing is copied: writing `mask(in)[3] = 0` writes the host's batch tensor.
//!
//! Why slices and not the raw pointers of the C header: a slice carries its length, so in
//! the default `ReleaseSafe` build (`wasmshare build x.zig`, `build_zig_guest`) every index
//! is checked and a bad one is a panic. In freestanding wasm a panic is a trap (wasm
//! `unreachable`), which ends this guest's sequence and nothing else; a C guest would
//! instead write past its row into its own state and answer garbage. Writing a read-only
//! window (the token table) traps too, because the host maps it read-only.
//!
//! A controller is a type with `create` and `step`, exported in one line:
//!
//! ```zig
//! const ws = @import("wasmshare");
//!
//! const NoEos = struct {
//!     sampled: u32,
//!
//!     pub fn create(ctx: *ws.Create) !NoEos {
//!         _ = try ctx.tokenTable(); // refuse a malformed vocabulary up front
//!         return .{ .sampled = 0 };
//!     }
//!
//!     pub fn step(self: *NoEos, s: *ws.Step) !void {
//!         self.sampled += @intCast(s.sampled().len);
//!         const eos = (try s.tokenTable()).eos() orelse return error.NoEos;
//!         if (self.sampled < 10) ws.maskBan(s.mask(), eos) else ws.maskAllow(s.mask(), eos);
//!         s.answer(.bitmask);
//!     }
//! };
//!
//! pub const panic = ws.trap_panic; // optional: the smallest panic handler (see below)
//!
//! comptime {
//!     ws.exportController(NoEos);
//! }
//! ```
//!
//! `create` and `step` may also take the raw records, like the C exports:
//! `create(in: *const ws.StepInput) !T` and
//! `step(self: *T, in: *const ws.StepInput, out: *ws.StepResult) !void`.
//!
//! A module imports only the host functions it calls: a controller that logs nothing and
//! uses no host constraint imports nothing. The ABI is docs/abi.md and
//! docs/controller-abi.md; the struct layouts are checked at compile time below.

const std = @import("std");
const builtin = @import("builtin");

comptime {
    // Pointers in the records are 32-bit guest addresses, as in `wasmshare.h`.
    if (builtin.cpu.arch != .wasm32)
        @compileError("wasmshare.zig is for wasm32 guests: build with `wasmshare build x.zig` " ++
            "or `zig build-exe -target wasm32-freestanding -fno-entry -rdynamic`");
}

// ---- constants ----------------------------------------------------------------------

/// Version of the core ABI (`WASMSHARE_ABI_VERSION`), what `ws_abi_version` returns.
pub const abi_version: i32 = 1;
/// Version of the controller ABI (`WS_CONTROLLER_ABI_VERSION`), what `ws_ctrl_abi_version` returns.
pub const controller_abi_version: i32 = 1;
/// Size of a wasm page (`WS_PAGE_SIZE`), and the alignment of every loan window.
pub const page_size: usize = 65536;
/// Capacity of a step result's fast-forward list (`WS_MAX_FF_TOKENS`).
pub const max_ff_tokens: usize = 1024;
/// Token flag (`WS_TOKEN_SPECIAL`): a special token (end of sequence, ...), whose bytes are not text.
pub const token_special: u8 = 1;
/// `"WSTT"` little-endian (`WS_TOKEN_TABLE_MAGIC`), the token table's magic.
pub const token_table_magic: u32 = 0x54545357;
/// An absent token id: `eos_token` / `bos_token` of a vocabulary without one (`UINT32_MAX`).
pub const no_token: u32 = 0xFFFFFFFF;

/// Status `WS_OK`: success.
pub const ok: i32 = 0;
/// Status `WS_ERR_BAD_HANDLE`: no region is offered under this handle.
pub const err_bad_handle: i32 = -1;
/// Status `WS_ERR_ACCESS`: the access asked for is not allowed.
pub const err_access: i32 = -2;
/// Status `WS_ERR_NOT_BORROWED`: `ws_release` of a handle not borrowed.
pub const err_not_borrowed: i32 = -3;
/// Status `WS_ERR_FAILED`: anything else; what an error from `create` or `step` becomes.
pub const err_failed: i32 = -4;

/// `ws_borrow` access code `WS_ACCESS_RO`: mapped read-only, a write traps.
pub const access_ro: i32 = 1;
/// `ws_borrow` access code `WS_ACCESS_RW`: mapped read-write.
pub const access_rw: i32 = 2;

/// `out.action` `WS_CONTINUE`: sample the next token.
pub const action_continue: i32 = 0;
/// `out.action` `WS_STOP`: the sequence ends after this step's fast-forward.
pub const action_stop: i32 = 1;

/// `out.output` `WS_OUTPUT_NONE`: no constraint; the slots are not read.
pub const output_none: i32 = 0;
/// `out.output` `WS_OUTPUT_BITMASK`: bit `t % 32` of `mask[t / 32]` set = token t allowed.
pub const output_bitmask: i32 = 1;
/// `out.output` `WS_OUTPUT_BIAS`: `bias[t]` is added to token t's logit.
pub const output_bias: i32 = 2;
/// `out.output` `WS_OUTPUT_SPARSE_BIAS`: `values[i]` is added to token `ids[i]`'s logit, i < `n_bias`.
pub const output_sparse_bias: i32 = 3;

/// Constraint kind `WS_CONSTRAINT_JSON_SCHEMA`: the spec is JSON Schema text.
pub const constraint_json_schema: i32 = 1;
/// Constraint kind `WS_CONSTRAINT_REGEX`: the spec is a regular expression.
pub const constraint_regex: i32 = 2;
/// Constraint kind `WS_CONSTRAINT_GRAMMAR`: the spec is a Lark grammar.
pub const constraint_grammar: i32 = 3;
/// Constraint kind `WS_CONSTRAINT_CHOICE`: the spec is a JSON list of strings.
pub const constraint_choice: i32 = 4;
/// Constraint kind `WS_CONSTRAINT_STOP`: a JSON list of strings; free text until one appears.
pub const constraint_stop: i32 = 5;
/// `WS_CONSTRAINT_ERR_BAD_HANDLE`: no open constraint has this handle.
pub const constraint_err_bad_handle: i32 = -1;
/// `WS_CONSTRAINT_ERR_SPEC`: the spec did not compile (the host logs why).
pub const constraint_err_spec: i32 = -2;
/// `WS_CONSTRAINT_ERR_REJECTED`: the token is not allowed in the current state.
pub const constraint_err_rejected: i32 = -3;
/// `WS_CONSTRAINT_ERR_BOUNDS`: the mask pointer or size is wrong.
pub const constraint_err_bounds: i32 = -4;

// ---- the records, exactly as the host lays them out ------------------------------------

/// `ws_token_table`: the header of the token table loan (64 bytes, read-only). Read it
/// through `tokenTable(in)`, which checks it, rather than directly.
pub const TokenTableHeader = extern struct {
    /// `@sizeOf(TokenTableHeader)` as the host wrote it.
    struct_size: u32,
    /// `token_table_magic`.
    magic: u32,
    /// 1.
    version: u32,
    /// Vocabulary size V.
    n_tokens: u32,
    /// Byte offset from the table start of `u32 offsets[V + 1]`.
    offsets_offset: u32,
    /// Byte offset of `u8 flags[V]` (`token_special`, ...).
    flags_offset: u32,
    /// Byte offset of the token bytes: token t is `bytes[offsets[t] .. offsets[t + 1])`.
    bytes_offset: u32,
    /// Total token bytes.
    bytes_len: u32,
    /// End-of-sequence id, or `no_token`.
    eos_token: u32,
    /// Beginning-of-sequence id, or `no_token`.
    bos_token: u32,
    /// 0; ignore.
    reserved: [6]u32,
};

/// `ws_step_input`: what the host tells a controller each call (68 bytes, host-written;
/// treat as read-only). The pointers are the addresses of this call's loans: read them
/// from `in` in every call, never keep them.
pub const StepInput = extern struct {
    /// `@sizeOf(StepInput)` as the host wrote it.
    struct_size: u32,
    /// The host's controller ABI version.
    abi_version: u32,
    /// V.
    vocab_size: u32,
    /// `ceil(V / 32)`.
    mask_words: u32,
    /// The token table loan.
    token_table: ?*const TokenTableHeader,
    /// Output slot: `u32[mask_words]` (use `mask(in)`).
    mask: ?[*]u32,
    /// Output slot: `f32[vocab_size]` (use `bias(in)` or `sparseBias(in)`).
    bias: ?[*]f32,
    /// 0 for create and the first step, then 1, 2, ...
    step: u32,
    /// Count of `tokens`.
    n_tokens: u32,
    /// Create: the prompt; step: the tokens sampled since the last step (use `tokens(in)`).
    tokens: ?[*]const u32,
    /// Create: the argument bytes, not NUL-terminated (use `arg(in)`).
    arg: ?[*]const u8,
    /// Create: their count (0 in steps).
    arg_len: u32,
    /// The host's id of this sequence.
    sequence_id: u32,
    /// 0; ignore.
    reserved: [4]u32,
};

/// `ws_step_result`: what a controller answers (4128 bytes). The host resets it before
/// every call (continue, output none, no backtrack, no fast-forward, `n_bias` 0).
pub const StepResult = extern struct {
    /// `@sizeOf(StepResult)` as the host wrote it.
    struct_size: u32,
    /// `action_continue` or `action_stop`.
    action: i32,
    /// `output_none`, `output_bitmask`, `output_bias` or `output_sparse_bias`.
    output: i32,
    /// Tokens to remove from the end before fast-forwarding.
    backtrack: u32,
    /// Count of `ff_tokens`, at most `max_ff_tokens`.
    n_ff: u32,
    /// `output_sparse_bias`: count of pairs, at most `vocab_size / 2`.
    n_bias: u32,
    /// 0; ignore.
    reserved: [2]u32,
    /// Tokens to append without sampling; only `[0, n_ff)` is read.
    ff_tokens: [max_ff_tokens]u32,
};

comptime {
    // The layouts of docs/controller-abi.md, field by field: a change here is an ABI break.
    const layouts = .{
        .{ TokenTableHeader, 64, .{
            .{ "struct_size", 0 },   .{ "magic", 4 },           .{ "version", 8 },
            .{ "n_tokens", 12 },     .{ "offsets_offset", 16 }, .{ "flags_offset", 20 },
            .{ "bytes_offset", 24 }, .{ "bytes_len", 28 },      .{ "eos_token", 32 },
            .{ "bos_token", 36 },    .{ "reserved", 40 },
        } },
        .{ StepInput, 68, .{
            .{ "struct_size", 0 },  .{ "abi_version", 4 }, .{ "vocab_size", 8 }, .{ "mask_words", 12 },
            .{ "token_table", 16 }, .{ "mask", 20 },       .{ "bias", 24 },      .{ "step", 28 },
            .{ "n_tokens", 32 },    .{ "tokens", 36 },     .{ "arg", 40 },       .{ "arg_len", 44 },
            .{ "sequence_id", 48 }, .{ "reserved", 52 },
        } },
        .{ StepResult, 32 + 4 * max_ff_tokens, .{
            .{ "struct_size", 0 }, .{ "action", 4 },  .{ "output", 8 },    .{ "backtrack", 12 },
            .{ "n_ff", 16 },       .{ "n_bias", 20 }, .{ "reserved", 24 }, .{ "ff_tokens", 32 },
        } },
    };
    for (layouts) |layout| {
        const T = layout[0];
        if (@sizeOf(T) != layout[1]) @compileError("sizeof " ++ @typeName(T));
        if (std.meta.fieldNames(T).len != layout[2].len) @compileError("fields of " ++ @typeName(T));
        for (layout[2]) |field| {
            if (@offsetOf(T, field[0]) != field[1]) @compileError(@typeName(T) ++ "." ++ field[0]);
        }
    }
}

// ---- slices over the lent windows ---------------------------------------------------

fn window(comptime T: type, ptr: ?[*]T, len: usize) []T {
    const p = ptr orelse return &[_]T{};
    return p[0..len];
}

fn constWindow(comptime T: type, ptr: ?[*]const T, len: usize) []const T {
    const p = ptr orelse return &[_]T{};
    return p[0..len];
}

/// The mask row, `mask_words` = `ceil(V / 32)` words: bit `t % 32` of word `t / 32` set =
/// token t allowed (bits past V are ignored). The row keeps its contents between steps.
pub fn mask(in: *const StepInput) []u32 {
    return window(u32, in.mask, in.mask_words);
}

/// The bias row, V floats added to the logits (`output_bias`). Keeps its contents between steps.
pub fn bias(in: *const StepInput) []f32 {
    return window(f32, in.bias, in.vocab_size);
}

/// The two halves of the bias slot that an `output_sparse_bias` answer fills.
pub const SparseBias = struct {
    /// Token ids: the first `V / 2` entries of the bias slot, read as `u32`.
    ids: []u32,
    /// Their values: `V / 2` floats from entry `V / 2` of the slot on.
    values: []f32,
};

/// The sparse-bias ids (`ws_sparse_bias_ids`): the first `V / 2` entries of the bias slot as `u32`.
pub fn sparseIds(in: *const StepInput) []u32 {
    const p: ?[*]u32 = if (in.bias) |b| @ptrCast(b) else null;
    return window(u32, p, in.vocab_size / 2);
}

/// The sparse-bias values (`ws_sparse_bias_values`): `V / 2` floats from float index `V / 2` on.
pub fn sparseValues(in: *const StepInput) []f32 {
    const p: ?[*]f32 = if (in.bias) |b| b + in.vocab_size / 2 else null;
    return window(f32, p, in.vocab_size / 2);
}

/// Both halves at once: write pair i as `ids[i]`, `values[i]`, answer `.{ .sparse_bias = n }`.
pub fn sparseBias(in: *const StepInput) SparseBias {
    return .{ .ids = sparseIds(in), .values = sparseValues(in) };
}

/// Create: the prompt; step: the tokens sampled since the previous step (none at step 0).
pub fn tokens(in: *const StepInput) []const u32 {
    return constWindow(u32, in.tokens, in.n_tokens);
}

/// The controller's argument bytes (create only: empty in steps, and not valid after create).
pub fn arg(in: *const StepInput) []const u8 {
    return constWindow(u8, in.arg, in.arg_len);
}

// ---- mask and bias helpers ------------------------------------------------------------

/// Ban every token (compiles to `memory.fill`).
pub fn maskClear(m: []u32) void {
    @memset(m, 0);
}

/// Allow every token (bits past V are ignored by the host).
pub fn maskFill(m: []u32) void {
    @memset(m, 0xFFFFFFFF);
}

/// Allow token `t`; an id past the row is ignored (the host ignores bits past V anyway).
pub fn maskAllow(m: []u32, t: u32) void {
    if (t / 32 < m.len) m[t / 32] |= @as(u32, 1) << @intCast(t % 32);
}

/// Ban token `t`; an id past the row is ignored.
pub fn maskBan(m: []u32, t: u32) void {
    if (t / 32 < m.len) m[t / 32] &= ~(@as(u32, 1) << @intCast(t % 32));
}

/// Whether token `t` is allowed; false past the row.
pub fn maskAllowed(m: []const u32, t: u32) bool {
    return t / 32 < m.len and (m[t / 32] >> @intCast(t % 32)) & 1 != 0;
}

/// Set every bias entry to `value` (compiles to `memory.fill` for zero).
pub fn biasFill(b: []f32, value: f32) void {
    @memset(b, value);
}

// ---- the token table ------------------------------------------------------------------

/// The tokenizer's vocabulary, read in place (from `tokenTable(in)`). `tokenTable` checks
/// that the table's arrays lie inside this guest's memory; every token's bytes are then
/// checked against the table's own offsets, so a malformed table gives `null`, never a read
/// of some other token's bytes or of memory past the table.
pub const TokenTable = struct {
    /// `offsets[V + 1]`, as the host wrote them (unchecked until `bytes` checks them).
    offsets: []const u32,
    /// `flags[V]` (`token_special`, ...).
    flags: []const u8,
    /// All token bytes, `bytes_len` of them.
    data: []const u8,
    /// End-of-sequence id, or `no_token`.
    eos_token: u32,
    /// Beginning-of-sequence id, or `no_token`.
    bos_token: u32,

    /// Number of tokens V.
    pub fn len(self: TokenTable) u32 {
        return @intCast(self.flags.len);
    }

    /// The raw bytes token `t` decodes to (UTF-8 fragments are possible; not
    /// NUL-terminated); `null` for an id out of range or offsets outside the table.
    pub fn bytes(self: TokenTable, t: u32) ?[]const u8 {
        if (t >= self.flags.len) return null;
        const start = self.offsets[t];
        const end = self.offsets[t + 1];
        if (start > end or end > self.data.len) return null;
        return self.data[start..end];
    }

    /// Whether token `t` is special (its bytes are not text); false out of range.
    pub fn isSpecial(self: TokenTable, t: u32) bool {
        return t < self.flags.len and self.flags[t] & token_special != 0;
    }

    /// The end-of-sequence token, if the vocabulary has one below V.
    pub fn eos(self: TokenTable) ?u32 {
        return if (self.eos_token < self.len()) self.eos_token else null;
    }

    /// The beginning-of-sequence token, if the vocabulary has one below V.
    pub fn bos(self: TokenTable) ?u32 {
        return if (self.bos_token < self.len()) self.bos_token else null;
    }

    /// Every token in id order: `var it = table.iterator(); while (it.next()) |tok| ...`.
    pub fn iterator(self: TokenTable) Iterator {
        return .{ .table = self, .next_id = 0 };
    }

    /// One entry of the table, as the iterator gives it.
    pub const Token = struct {
        /// Its id.
        id: u32,
        /// Its bytes; empty when the table's offsets for it are malformed (`bytes` gives null).
        bytes: []const u8,
        /// Whether it is special.
        special: bool,
    };

    /// Iterator over the tokens, from id 0 to V - 1.
    pub const Iterator = struct {
        /// The table iterated over.
        table: TokenTable,
        /// The id `next` gives next.
        next_id: u32,

        /// The next token, or `null` after the last.
        pub fn next(self: *Iterator) ?Token {
            const id = self.next_id;
            if (id >= self.table.len()) return null;
            self.next_id += 1;
            return .{
                .id = id,
                .bytes = self.table.bytes(id) orelse &[_]u8{},
                .special = self.table.isSpecial(id),
            };
        }
    };
};

/// Bytes of linear memory now: loans lie inside it, so the table's arrays must too.
fn memoryBytes() u64 {
    return @as(u64, @wasmMemorySize(0)) * page_size;
}

/// The token table of `in`, after checking its magic, version, size and that its three
/// arrays lie inside linear memory. O(1): per-token offsets are checked by `bytes`.
pub fn tokenTable(in: *const StepInput) error{BadTokenTable}!TokenTable {
    const h = in.token_table orelse return error.BadTokenTable;
    if (h.magic != token_table_magic or h.version != 1 or h.struct_size < @sizeOf(TokenTableHeader))
        return error.BadTokenTable;
    if (h.offsets_offset % 4 != 0) return error.BadTokenTable;
    // 64-bit sums: no header value can wrap a check around.
    const base: u64 = @intFromPtr(h);
    const n: u64 = h.n_tokens;
    const limit = memoryBytes();
    if (base + h.offsets_offset + 4 * (n + 1) > limit or
        base + h.flags_offset + n > limit or
        base + h.bytes_offset + h.bytes_len > limit)
        return error.BadTokenTable;
    const start: [*]const u8 = @ptrCast(h);
    const offsets: [*]const u32 = @ptrCast(@alignCast(start + h.offsets_offset));
    return .{
        .offsets = offsets[0..@intCast(n + 1)],
        .flags = (start + h.flags_offset)[0..@intCast(n)],
        .data = (start + h.bytes_offset)[0..h.bytes_len],
        .eos_token = h.eos_token,
        .bos_token = h.bos_token,
    };
}

// ---- memory ---------------------------------------------------------------------------

/// Grow linear memory by enough pages for `count` zeroed `T` and return them, 64 KiB
/// aligned (`ws_grow_block`). Call it from `create` only: a step must not allocate. `null`
/// when memory cannot grow (the host's memory limit). The pages are never given back.
pub fn grow(comptime T: type, count: usize) ?[]T {
    const nbytes = std.math.mul(usize, count, @sizeOf(T)) catch return null;
    if (nbytes == 0) return &[_]T{};
    const pages = nbytes / page_size + @intFromBool(nbytes % page_size != 0);
    const old = @wasmMemoryGrow(0, pages);
    if (old < 0) return null;
    const p: [*]T = @ptrFromInt(@as(usize, @intCast(old)) * page_size);
    return p[0..count];
}

// ---- host imports (module "wasmshare") --------------------------------------------------

/// The raw host imports, as `wasmshare.h` and `wasmshare_controller.h` declare them. A
/// declaration costs nothing: a function is imported only if the module calls it.
pub const sys = struct {
    /// Map the region offered under `handle`; its guest address, or 0 on failure.
    pub extern "wasmshare" fn ws_borrow(handle: i32, access: i32) i32;
    /// End a borrow early: `ok`, `err_bad_handle` or `err_not_borrowed`.
    pub extern "wasmshare" fn ws_release(handle: i32) i32;
    /// Size in bytes of the region offered under `handle`, or `err_bad_handle`.
    pub extern "wasmshare" fn ws_region_size(handle: i32) i64;
    /// Log `len` bytes of UTF-8 at `msg` on the host.
    pub extern "wasmshare" fn ws_log(msg: [*]const u8, len: i32) void;
    /// Compile a constraint: a handle > 0, or `constraint_err_spec`.
    pub extern "wasmshare" fn ws_constraint_open(kind: i32, spec: [*]const u8, len: i32) i32;
    /// Write the mask of the constraint's current state at `m` (`words` words).
    pub extern "wasmshare" fn ws_constraint_fill_mask(handle: i32, m: [*]u32, words: i32) i32;
    /// Advance by a sampled token.
    pub extern "wasmshare" fn ws_constraint_consume(handle: i32, token: u32) i32;
    /// 1 when the text so far is a complete match.
    pub extern "wasmshare" fn ws_constraint_is_accepting(handle: i32) i32;
    /// 1 when nothing but end-of-sequence may follow.
    pub extern "wasmshare" fn ws_constraint_is_stopped(handle: i32) i32;
    /// Forget the constraint.
    pub extern "wasmshare" fn ws_constraint_close(handle: i32) i32;
};

/// Log `msg` on the host, tagged with the guest's name (imports `ws_log`).
pub fn log(msg: []const u8) void {
    sys.ws_log(msg.ptr, @intCast(@min(msg.len, std.math.maxInt(i32))));
}

/// How a region is borrowed.
pub const Access = enum(i32) {
    /// Mapped read-only: a write traps.
    read_only = access_ro,
    /// Mapped read-write.
    read_write = access_rw,
};

/// Size in bytes of the region the host offers under `handle`.
pub fn regionSize(handle: i32) error{BadHandle}!u64 {
    const size = sys.ws_region_size(handle);
    return if (size < 0) error.BadHandle else @intCast(size);
}

/// Map the region offered under `handle` with `access` and return it as bytes. The slice
/// is valid until `release(handle)` or until the outermost host call into the guest
/// returns, whichever is first; afterwards an access traps, so never keep it in a global.
pub fn borrow(handle: i32, access: Access) error{ BadHandle, BorrowFailed }![]u8 {
    const size = try regionSize(handle);
    if (size > std.math.maxInt(u32)) return error.BorrowFailed;
    const addr = sys.ws_borrow(handle, @backingInt(access));
    if (addr == 0) return error.BorrowFailed;
    const p: [*]u8 = @ptrFromInt(@as(u32, @bitCast(addr)));
    return p[0..@intCast(size)];
}

/// End a borrow early; `error.NotBorrowed` when `handle` is not borrowed.
pub fn release(handle: i32) error{ BadHandle, NotBorrowed }!void {
    return switch (sys.ws_release(handle)) {
        ok => {},
        err_bad_handle => error.BadHandle,
        else => error.NotBorrowed,
    };
}

/// Kinds of constraint the host's grammar engine compiles (`WS_CONSTRAINT_*`).
pub const ConstraintKind = enum(i32) {
    /// JSON Schema text.
    json_schema = constraint_json_schema,
    /// A regular expression.
    regex = constraint_regex,
    /// A Lark grammar.
    grammar = constraint_grammar,
    /// A JSON list of strings.
    choice = constraint_choice,
    /// A JSON list of strings: free text, stopped once one appears.
    stop = constraint_stop,
};

/// Errors of the `ws_constraint_*` calls.
pub const ConstraintError = error{ BadHandle, BadSpec, Rejected, Bounds };

fn constraintStatus(rc: i32) ConstraintError!void {
    return switch (rc) {
        constraint_err_bad_handle => error.BadHandle,
        constraint_err_spec => error.BadSpec,
        constraint_err_rejected => error.Rejected,
        constraint_err_bounds => error.Bounds,
        else => if (rc < 0) error.BadHandle else {},
    };
}

/// A constraint compiled by the host's grammar engine (`ws_constraint_*`): it writes the
/// masks, the controller decides when. At most 16 are open per controller.
pub const Constraint = struct {
    /// The host's handle (> 0).
    handle: i32,

    /// Compile `spec` (cached by the host by spec and tokenizer).
    pub fn open(kind: ConstraintKind, spec: []const u8) ConstraintError!Constraint {
        if (spec.len > std.math.maxInt(i32)) return error.BadSpec;
        const h = sys.ws_constraint_open(@backingInt(kind), spec.ptr, @intCast(spec.len));
        try constraintStatus(h);
        if (h == 0) return error.BadSpec;
        return .{ .handle = h };
    }

    /// Have the host write the mask of the current state into `m`: pass `mask(in)`, the
    /// controller's lent row, so the host writes it in place.
    pub fn fillMask(self: Constraint, m: []u32) ConstraintError!void {
        if (m.len > std.math.maxInt(i32)) return error.Bounds;
        try constraintStatus(sys.ws_constraint_fill_mask(self.handle, m.ptr, @intCast(m.len)));
    }

    /// Advance by a sampled token; `error.Rejected` when the constraint does not allow it.
    pub fn consume(self: Constraint, token: u32) ConstraintError!void {
        try constraintStatus(sys.ws_constraint_consume(self.handle, token));
    }

    /// Whether the text so far is a complete match.
    pub fn isAccepting(self: Constraint) bool {
        return sys.ws_constraint_is_accepting(self.handle) == 1;
    }

    /// Whether nothing but end-of-sequence may follow.
    pub fn isStopped(self: Constraint) bool {
        return sys.ws_constraint_is_stopped(self.handle) == 1;
    }

    /// Forget the constraint.
    pub fn close(self: Constraint) void {
        _ = sys.ws_constraint_close(self.handle);
    }
};

// ---- panic handlers -------------------------------------------------------------------

/// A panic handler that traps at once (`pub const panic = ws.trap_panic;` in the root
/// file): the smallest modules, importing nothing. Without a `panic` declaration Zig's
/// default handler traps too in freestanding wasm, but first formats a message it then
/// drops, which costs a few KiB of code.
pub const trap_panic = std.debug.no_panic;

/// A panic handler that logs `panic: MESSAGE` (e.g. `index out of bounds: index 9, len 4`)
/// through `ws_log`, then traps (`pub const panic = ws.log_panic;` in the root file). The
/// module then imports `ws_log`, which every wasmshare host provides.
pub const log_panic = std.debug.FullPanic(logAndTrap);

fn logAndTrap(msg: []const u8, first_trace_addr: ?usize) noreturn {
    @branchHint(.cold);
    _ = first_trace_addr;
    const prefix = "panic: ";
    var buf: [prefix.len + 256]u8 = undefined;
    const n = @min(msg.len, buf.len - prefix.len);
    buf[0..prefix.len].* = prefix.*;
    @memcpy(buf[prefix.len..][0..n], msg[0..n]);
    sys.ws_log(&buf, @intCast(prefix.len + n));
    @trap();
}

// ---- exports --------------------------------------------------------------------------

/// Export `ws_abi_version` (returns `abi_version`), which the host checks first. Every
/// wasmshare guest needs it; `exportController` and `exportControllerAbi` include it, so
/// call this only in a guest that is not a controller (a plugin, a plain guest). Use it in
/// a `comptime` block; exporting the name twice is a compile error.
pub fn exportAbiVersion() void {
    @export(&abiVersionExport, .{ .name = "ws_abi_version" });
}

fn abiVersionExport() callconv(.c) i32 {
    return abi_version;
}

fn controllerAbiVersionExport() callconv(.c) i32 {
    return controller_abi_version;
}

/// Export `ws_abi_version` and `ws_ctrl_abi_version` for a controller whose
/// `ws_ctrl_create` / `ws_ctrl_step` are written by hand as
/// `export fn ws_ctrl_step(in: *const ws.StepInput, out: *ws.StepResult) i32`.
/// `exportController` does this for you.
pub fn exportControllerAbi() void {
    exportAbiVersion();
    @export(&controllerAbiVersionExport, .{ .name = "ws_ctrl_abi_version" });
}

/// What `create` sees: the argument, the prompt, the vocabulary and the output slots.
pub const Create = struct {
    /// The raw record.
    in: *const StepInput,

    /// The argument bytes (valid during create only: copy what you keep).
    pub fn arg(self: *const Create) []const u8 {
        return argOf(self.in);
    }

    /// The prompt's tokens.
    pub fn prompt(self: *const Create) []const u32 {
        return tokens(self.in);
    }

    /// V.
    pub fn vocabSize(self: *const Create) u32 {
        return self.in.vocab_size;
    }

    /// The host's id of this sequence.
    pub fn sequenceId(self: *const Create) u32 {
        return self.in.sequence_id;
    }

    /// The checked token table.
    pub fn tokenTable(self: *const Create) error{BadTokenTable}!TokenTable {
        return tokenTableOf(self.in);
    }

    /// The mask row (all-allowed before create).
    pub fn mask(self: *const Create) []u32 {
        return maskOf(self.in);
    }

    /// The bias row (zero before create).
    pub fn bias(self: *const Create) []f32 {
        return biasOf(self.in);
    }

    /// The sparse-bias halves of the bias slot.
    pub fn sparseBias(self: *const Create) SparseBias {
        return sparseBiasOf(self.in);
    }
};

// Aliases so that the methods above and below, named like the free functions, can call them.
const argOf = arg;
const tokenTableOf = tokenTable;
const maskOf = mask;
const biasOf = bias;
const sparseBiasOf = sparseBias;
const tokensOf = tokens;

/// What a step sees and answers.
pub const Step = struct {
    /// The raw record.
    in: *const StepInput,
    /// The answer, reset by the host before the call.
    out: *StepResult,

    /// The tokens sampled since the previous step (none at step 0).
    pub fn sampled(self: *const Step) []const u32 {
        return tokensOf(self.in);
    }

    /// This step's number: 0, 1, 2, ...
    pub fn index(self: *const Step) u32 {
        return self.in.step;
    }

    /// V.
    pub fn vocabSize(self: *const Step) u32 {
        return self.in.vocab_size;
    }

    /// The checked token table.
    pub fn tokenTable(self: *const Step) error{BadTokenTable}!TokenTable {
        return tokenTableOf(self.in);
    }

    /// The mask row; it keeps its contents between steps.
    pub fn mask(self: *const Step) []u32 {
        return maskOf(self.in);
    }

    /// The bias row; it keeps its contents between steps.
    pub fn bias(self: *const Step) []f32 {
        return biasOf(self.in);
    }

    /// The sparse-bias halves of the bias slot.
    pub fn sparseBias(self: *const Step) SparseBias {
        return sparseBiasOf(self.in);
    }

    /// Sample the next token under `output` (sets `out.output`, and `out.n_bias` for sparse).
    pub fn answer(self: *Step, output: Output) void {
        switch (output) {
            .none => self.out.output = output_none,
            .bitmask => self.out.output = output_bitmask,
            .bias => self.out.output = output_bias,
            .sparse_bias => |n| {
                self.out.output = output_sparse_bias;
                self.out.n_bias = n;
            },
        }
    }

    /// End the sequence after this step's backtrack and fast-forward.
    pub fn stop(self: *Step) void {
        self.out.action = action_stop;
    }

    /// Remove `n` tokens from the end before fast-forwarding.
    pub fn backtrack(self: *Step, n: u32) void {
        self.out.backtrack = n;
    }

    /// Append `toks` without sampling; `error.TooManyTokens` past `max_ff_tokens` (fast-forward
    /// a longer answer over several steps).
    pub fn fastForward(self: *Step, toks: []const u32) error{TooManyTokens}!void {
        if (toks.len > max_ff_tokens) return error.TooManyTokens;
        @memcpy(self.out.ff_tokens[0..toks.len], toks);
        self.out.n_ff = @intCast(toks.len);
    }
};

/// What the next token is sampled under, for `Step.answer`.
pub const Output = union(enum) {
    /// No constraint.
    none,
    /// The mask row.
    bitmask,
    /// The bias row.
    bias,
    /// The first `n` pairs of `sparseBias` (at most `V / 2`).
    sparse_bias: u32,
};

/// Export controller type `T` as this module's controller: `ws_abi_version`,
/// `ws_ctrl_abi_version`, `ws_ctrl_create`, `ws_ctrl_step` and `ws_ctrl_free`. Use it in a
/// `comptime` block of the root file, once.
///
/// `T` declares
///   `pub fn create(ctx: *ws.Create) !T` or `pub fn create(in: *const ws.StepInput) !T`:
///       parse the argument and prepare, once; an error fails the sequence before it starts
///       (`err_failed`), as a bad argument should;
///   `pub fn step(self: *T, s: *ws.Step) !void` or
///   `pub fn step(self: *T, in: *const ws.StepInput, out: *ws.StepResult) !void`:
///       answer one step; an error ends the sequence (`err_failed`). Never allocate here;
///   optionally `pub fn deinit(self: *T) void`, run by `ws_ctrl_free` when the sequence ends.
/// Either may return a plain value instead of an error union.
///
/// Each sequence has its own instance of the module, so the one `T` kept here (a global)
/// is that sequence's state.
pub fn exportController(comptime T: type) void {
    const S = ControllerExports(T);
    exportControllerAbi();
    @export(&S.create, .{ .name = "ws_ctrl_create" });
    @export(&S.step, .{ .name = "ws_ctrl_step" });
    @export(&S.free, .{ .name = "ws_ctrl_free" });
}

fn ControllerExports(comptime T: type) type {
    const name = @typeName(T);
    if (!@hasDecl(T, "create") or !@hasDecl(T, "step"))
        @compileError("exportController(" ++ name ++ "): " ++ name ++ " needs `pub fn create(ctx: *ws.Create) !" ++
            name ++ "` and `pub fn step(self: *" ++ name ++ ", s: *ws.Step) !void`");
    // (Zig 0.17's std.lang.Type.Fn: `param_types`, `return_type`.)
    const create_fn = @typeInfo(@TypeOf(T.create)).@"fn";
    const step_fn = @typeInfo(@TypeOf(T.step)).@"fn";
    const cp = create_fn.param_types;
    const sp = step_fn.param_types;
    const create_raw = cp.len == 1 and cp[0] == *const StepInput;
    const create_ctx = cp.len == 1 and (cp[0] == *Create or cp[0] == *const Create);
    if (!create_raw and !create_ctx)
        @compileError("exportController(" ++ name ++ "): create must take `ctx: *ws.Create` or `in: *const ws.StepInput`");
    if (create_fn.return_type == null or unwrapped(create_fn.return_type.?) != T)
        @compileError("exportController(" ++ name ++ "): create must return " ++ name ++ " or !" ++ name);
    const step_raw = sp.len == 3 and sp[0] == *T and sp[1] == *const StepInput and sp[2] == *StepResult;
    const step_ctx = sp.len == 2 and sp[0] == *T and sp[1] == *Step;
    if (!step_raw and !step_ctx)
        @compileError("exportController(" ++ name ++ "): step must be `step(self: *" ++ name ++
            ", s: *ws.Step)` or `step(self: *" ++ name ++ ", in: *const ws.StepInput, out: *ws.StepResult)`");
    if (step_fn.return_type == null or unwrapped(step_fn.return_type.?) != void)
        @compileError("exportController(" ++ name ++ "): step must return void or !void");

    return struct {
        /// This sequence's controller, once create succeeded.
        var state: ?T = null;

        /// Whether the host's records are at least as large as this SDK's: a shorter one
        /// would make the SDK read past it.
        fn recordsFit(in: *const StepInput, out: ?*const StepResult) bool {
            if (in.struct_size < @sizeOf(StepInput)) return false;
            const o = out orelse return true;
            return o.struct_size >= @sizeOf(StepResult);
        }

        fn create(in: ?*const StepInput, out: ?*StepResult) callconv(.c) i32 {
            _ = out; // reserved at create: the host ignores it
            if (state) |*old| deinitState(old); // a second create starts over
            state = null;
            const input = in orelse return err_failed;
            if (!recordsFit(input, null)) return err_failed;
            const made = if (create_raw) T.create(input) else blk: {
                var ctx = Create{ .in = input };
                break :blk T.create(&ctx);
            };
            state = if (comptime isErrorUnion(@TypeOf(made))) (made catch return err_failed) else made;
            return ok;
        }

        fn step(in: ?*const StepInput, out: ?*StepResult) callconv(.c) i32 {
            const self = if (state) |*s| s else return err_failed; // create failed or never ran
            const input = in orelse return err_failed;
            const output = out orelse return err_failed;
            if (!recordsFit(input, output)) return err_failed;
            const done = if (step_raw) self.step(input, output) else blk: {
                var s = Step{ .in = input, .out = output };
                break :blk self.step(&s);
            };
            if (comptime isErrorUnion(@TypeOf(done))) done catch return err_failed;
            return ok;
        }

        fn free() callconv(.c) void {
            if (state) |*s| deinitState(s);
            state = null;
        }

        fn deinitState(s: *T) void {
            if (comptime @hasDecl(T, "deinit")) s.deinit();
        }
    };
}

fn isErrorUnion(comptime R: type) bool {
    return @typeInfo(R) == .error_union;
}

fn unwrapped(comptime R: type) type {
    return switch (@typeInfo(R)) {
        .error_union => |eu| eu.payload,
        else => R,
    };
}
