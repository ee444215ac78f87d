//! A minimal reader of kernel BTF, including split (module) BTF.
//!
//! Identity mode attaches fexit programs to functions of the `wireguard` module and reads a few
//! of its structs with `bpf_probe_read_kernel`: the function ids and member offsets come from the
//! module's BTF at runtime. Module BTF (`/sys/kernel/btf/<module>`) is *split* BTF over
//! `/sys/kernel/btf/vmlinux`, which aya cannot parse (aya-rs/aya#301), hence this reader.
//!
//! Split BTF continues its base: its first type id is the number of base types (void, id 0,
//! included), its types refer to base types by their base ids, and a string offset at or past the
//! length of the base's string section is one into the split's own strings (minus that length).
//! The ids returned here are therefore the kernel's: what `BPF_PROG_LOAD` wants in
//! `attach_btf_id` (with the module's BTF object as `attach_btf_obj_fd`).
//!
//! Parsing is bounds-checked and checks every string offset and type reference up front; the
//! lookups bound the chains they follow. Hostile BTF gives an error, never a panic or a hang.
//! Little-endian BTF of a 64-bit kernel only (pointers are 8 bytes). Types are kept as 20-byte
//! records over the raw bytes and names are resolved on demand; lookups by name are linear scans
//! (they run a handful of times at agent start).

use std::{
    fmt, io,
    ops::Range,
    path::{Path, PathBuf},
};

/// Where the kernel exposes its BTF: `vmlinux`, and one file per module.
pub const SYSFS_BTF: &str = "/sys/kernel/btf";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_HEADER_LEN: usize = 12;
/// Longest chain of typedefs, modifiers, arrays or nested anonymous members followed.
const MAX_DEPTH: usize = 32;
/// Types one [`Btf::describe`] visits, so that self-referencing BTF gives a short string.
const DESCRIBE_BUDGET: u32 = 64;
/// Anonymous struct/union members one member lookup descends into.
const ANON_BUDGET: u32 = 4096;
/// The size of a pointer: 64-bit kernels only.
const PTR_SIZE: u64 = 8;

/// Why BTF could not be read, or lacks what was asked for.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("kernel BTF {} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF", path.display())]
    KernelBtfMissing { path: PathBuf },
    #[error(
        "module BTF {} is missing: module {module:?} is not loaded (modprobe {module}), or the \
         kernel was built without CONFIG_DEBUG_INFO_BTF_MODULES",
        path.display()
    )]
    ModuleBtfMissing { module: String, path: PathBuf },
    #[error("{module:?} is not a kernel module name")]
    BadModuleName { module: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{origin} is big-endian BTF (its magic 0xeb9f is byte-swapped); only little-endian BTF \
         is supported"
    )]
    BigEndian { origin: String },
    #[error("{origin} is not BTF: its magic is {magic:#06x}, not 0xeb9f")]
    BadMagic { origin: String, magic: u16 },
    #[error("malformed {origin}: {reason}")]
    Malformed { origin: String, reason: String },
    #[error("{origin} is split BTF already; split BTF over split BTF is not supported")]
    NestedSplit { origin: String },
    #[error("{origin} has no function {name}")]
    NoFunction { origin: String, name: String },
    #[error("{origin} has no struct or union {name}")]
    NoStruct { origin: String, name: String },
    #[error("{origin}: {path} ({ty}) has no member {member:?}")]
    NoMember {
        origin: String,
        path: String,
        ty: String,
        member: String,
    },
    #[error("{origin}: {path} is {ty}, not a struct or union, so it has no member {member:?}")]
    NotComposite {
        origin: String,
        path: String,
        ty: String,
        member: String,
    },
    #[error("{origin}: {path} is a bitfield; only whole-byte members can be read")]
    Bitfield { origin: String, path: String },
    #[error("{origin}: {path} starts at bit {bits}, not on a byte boundary")]
    Unaligned {
        origin: String,
        path: String,
        bits: u64,
    },
    #[error("{origin} has no type {id} (it has {count} types)")]
    NoType {
        origin: String,
        id: u32,
        count: usize,
    },
    #[error("{origin}: type {id} ({ty}) has no size")]
    NoSize { origin: String, id: u32, ty: String },
    #[error("{origin}: type {id} ({ty}) is larger than 4 GiB")]
    TooLarge { origin: String, id: u32, ty: String },
    #[error(
        "{origin}: gave up after following {MAX_DEPTH} types from type {id} (a reference cycle?)"
    )]
    TooDeep { origin: String, id: u32 },
}

/// A function (BTF `FUNC`) and its prototype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// The kernel's id of the `FUNC`: `attach_btf_id` for fentry/fexit.
    pub id: u32,
    pub name: String,
    /// The named parameters, in order (a trailing `...` is [`Function::variadic`]).
    pub params: Vec<Param>,
    /// The return type (0: void).
    pub return_type: u32,
    pub variadic: bool,
}

/// A parameter of a [`Function`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub type_id: u32,
}

/// Where a (nested) member of a struct lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Bytes from the start of the outermost struct.
    pub offset: u32,
    /// The member's declared type (typedefs and modifiers not resolved).
    pub type_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(raw: u32) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Bytes of kind-specific data after the 12-byte type header.
    fn extra_len(self, vlen: usize) -> usize {
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            Kind::Void
            | Kind::Ptr
            | Kind::Fwd
            | Kind::Typedef
            | Kind::Volatile
            | Kind::Const
            | Kind::Restrict
            | Kind::Func
            | Kind::Float
            | Kind::TypeTag => 0,
        }
    }

    /// Kinds whose `size_or_type` is a type id.
    fn refers_by_type(self) -> bool {
        matches!(
            self,
            Kind::Ptr
                | Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::TypeTag
                | Kind::Func
                | Kind::FuncProto
                | Kind::Var
                | Kind::DeclTag
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Void => "void",
            Kind::Int => "INT",
            Kind::Ptr => "PTR",
            Kind::Array => "ARRAY",
            Kind::Struct => "STRUCT",
            Kind::Union => "UNION",
            Kind::Enum => "ENUM",
            Kind::Fwd => "FWD",
            Kind::Typedef => "TYPEDEF",
            Kind::Volatile => "VOLATILE",
            Kind::Const => "CONST",
            Kind::Restrict => "RESTRICT",
            Kind::Func => "FUNC",
            Kind::FuncProto => "FUNC_PROTO",
            Kind::Var => "VAR",
            Kind::Datasec => "DATASEC",
            Kind::Float => "FLOAT",
            Kind::DeclTag => "DECL_TAG",
            Kind::TypeTag => "TYPE_TAG",
            Kind::Enum64 => "ENUM64",
        })
    }
}

/// One type: its header, and where its kind-specific data starts in its part's type section.
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: Kind,
    kind_flag: bool,
    vlen: u16,
    name_off: u32,
    size_or_type: u32,
    extra: u32,
}

const VOID: Type = Type {
    kind: Kind::Void,
    kind_flag: false,
    vlen: 0,
    name_off: 0,
    size_or_type: 0,
    extra: 0,
};

/// The raw bytes of one BTF blob, and where its sections are.
struct Part {
    data: Vec<u8>,
    types: Range<usize>,
    strings: Range<usize>,
}

impl Part {
    fn strings(&self) -> &[u8] {
        self.data.get(self.strings.clone()).unwrap_or_default()
    }

    fn type_section(&self) -> &[u8] {
        self.data.get(self.types.clone()).unwrap_or_default()
    }
}

/// A member of a struct or union as BTF stores it.
struct RawMember {
    name_off: u32,
    type_id: u32,
    /// Bits from the start of the container.
    bit_offset: u32,
    /// Non-zero for a bitfield of a struct with `kind_flag`.
    bitfield_size: u32,
}

/// What a member lookup found in one container (anonymous members descended into).
struct Found {
    bits: u64,
    type_id: u32,
    bitfield_size: u32,
}

/// Base BTF (`vmlinux`), or split BTF (a module's) together with its base.
pub struct Btf {
    origin: String,
    /// Indexed by type id; id 0 is void.
    types: Vec<Type>,
    /// Types `0..base_types` are the base's, the rest the split's.
    base_types: usize,
    base: Part,
    split: Option<Part>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("origin", &self.origin)
            .field("types", &self.types.len())
            .field("base_types", &self.base_types)
            .finish_non_exhaustive()
    }
}

fn le_u16(data: &[u8], at: usize) -> Option<u16> {
    let bytes = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

// A slice pattern, not `try_into`: this runs a few million times per vmlinux parse, and the
// agent's debug builds (tests) pay for every layer of abstraction.
fn le_u32(data: &[u8], at: usize) -> Option<u32> {
    match data.get(at..)? {
        [a, b, c, d, ..] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

fn usize_of(value: u32) -> usize {
    // Lossless: usize is at least 32 bits wide on every target the agent builds for.
    value as usize
}

/// Parses the header, sections and type records of one blob. `first_id` numbers its first
/// type; `split` relaxes the string-section rules the way libbpf does for split BTF.
fn parse_part(
    data: Vec<u8>,
    origin: &str,
    first_id: usize,
    split: bool,
) -> Result<(Part, Vec<Type>), BtfError> {
    let malformed = |reason: String| BtfError::Malformed {
        origin: origin.to_owned(),
        reason,
    };
    let header = |at: usize| {
        le_u32(&data, at).ok_or_else(|| {
            malformed(format!(
                "{} bytes is shorter than the {HEADER_LEN}-byte BTF header",
                data.len()
            ))
        })
    };
    let magic = le_u16(&data, 0).ok_or_else(|| {
        malformed(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte BTF header",
            data.len()
        ))
    })?;
    if magic == MAGIC.swap_bytes() {
        return Err(BtfError::BigEndian {
            origin: origin.to_owned(),
        });
    }
    if magic != MAGIC {
        return Err(BtfError::BadMagic {
            origin: origin.to_owned(),
            magic,
        });
    }
    let hdr_len = header(4)?;
    let version = data.get(2).copied().unwrap_or_default();
    if version != 1 {
        return Err(malformed(format!(
            "BTF version {version}; only version 1 is known"
        )));
    }
    let (type_off, type_len) = (header(8)?, header(12)?);
    let (str_off, str_len) = (header(16)?, header(20)?);
    let hdr_len = usize_of(hdr_len);
    if hdr_len < HEADER_LEN || hdr_len > data.len() {
        return Err(malformed(format!(
            "header length {hdr_len} is not between {HEADER_LEN} and the data's {} bytes",
            data.len()
        )));
    }
    // A longer header is a newer one: refuse fields this reader does not know (as libbpf does).
    if data
        .get(HEADER_LEN..hdr_len)
        .is_some_and(|rest| rest.iter().any(|&b| b != 0))
    {
        return Err(malformed(format!(
            "the {hdr_len}-byte header has non-zero fields past the {HEADER_LEN} bytes of              version 1"
        )));
    }
    let section = |name: &str, off: u32, len: u32| {
        let start = hdr_len as u64 + u64::from(off);
        let end = start + u64::from(len);
        if end > data.len() as u64 {
            return Err(malformed(format!(
                "the {name} section (bytes {start}..{end}) extends past the end of the data \
                 ({} bytes)",
                data.len()
            )));
        }
        // Both fit in usize: they are at most data.len().
        Ok(usize::try_from(start).unwrap_or_default()..usize::try_from(end).unwrap_or_default())
    };
    let types = section("type", type_off, type_len)?;
    let strings = section("string", str_off, str_len)?;
    if type_off % 4 != 0 {
        return Err(malformed(format!(
            "the type section offset {type_off} is not a multiple of 4"
        )));
    }
    if types.end > strings.start {
        return Err(malformed(format!(
            "the type section (bytes {types:?}) does not end before the string section (bytes \
             {strings:?})"
        )));
    }
    let strs = data.get(strings.clone()).unwrap_or_default();
    if !(split && strs.is_empty()) {
        if strs.last() != Some(&0) {
            return Err(malformed(
                "the string section does not end with a NUL byte".to_owned(),
            ));
        }
        if !split && strs.first() != Some(&0) {
            return Err(malformed(
                "the string section does not start with the empty string".to_owned(),
            ));
        }
    }

    let type_bytes = data.get(types.clone()).unwrap_or_default();
    let mut parsed = Vec::with_capacity(type_bytes.len() / 16);
    let mut pos = 0;
    while pos < type_bytes.len() {
        let id = first_id + parsed.len();
        let truncated = || {
            malformed(format!(
                "type {id} at byte {pos} of the type section is truncated"
            ))
        };
        let (Some(name_off), Some(info), Some(size_or_type)) = (
            le_u32(type_bytes, pos),
            le_u32(type_bytes, pos + 4),
            le_u32(type_bytes, pos + 8),
        ) else {
            return Err(truncated());
        };
        let raw_kind = (info >> 24) & 0x1f;
        let kind = Kind::from_raw(raw_kind)
            .ok_or_else(|| malformed(format!("type {id} has unknown kind {raw_kind}")))?;
        let vlen = (info & 0xffff) as u16;
        let extra = pos + TYPE_HEADER_LEN;
        let end = extra + kind.extra_len(usize::from(vlen));
        if end > type_bytes.len() {
            return Err(truncated());
        }
        if u32::try_from(id).is_err() {
            return Err(malformed("more than 2^32 types".to_owned()));
        }
        parsed.push(Type {
            kind,
            kind_flag: info & (1 << 31) != 0,
            vlen,
            name_off,
            size_or_type,
            // The type section is at most u32::MAX bytes long (type_len is a u32).
            extra: u32::try_from(extra).unwrap_or(u32::MAX),
        });
        pos = end;
    }
    Ok((
        Part {
            data,
            types,
            strings,
        },
        parsed,
    ))
}

impl Btf {
    /// Parses base BTF (such as `/sys/kernel/btf/vmlinux`).
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        Btf::parse_base(data.to_vec(), "base BTF".to_owned())
    }

    /// Parses split BTF (such as `/sys/kernel/btf/wireguard`) over its base.
    pub fn parse_split(base: Btf, data: &[u8]) -> Result<Btf, BtfError> {
        base.add_split(data.to_vec(), "split BTF".to_owned())
    }

    /// Reads the running kernel's BTF for `module` (`vmlinux`: the kernel's own).
    pub fn from_kernel(module: &str) -> Result<Btf, BtfError> {
        Btf::from_dir(Path::new(SYSFS_BTF), module)
    }

    /// [`Btf::from_kernel`] over another directory laid out like `/sys/kernel/btf`.
    fn from_dir(dir: &Path, module: &str) -> Result<Btf, BtfError> {
        let read = |path: PathBuf| match std::fs::read(&path) {
            Ok(data) => Ok(Ok(data)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Err(path)),
            Err(source) => Err(BtfError::Read { path, source }),
        };
        let base_path = dir.join("vmlinux");
        let base_origin = format!("kernel BTF {}", base_path.display());
        let base = match read(base_path)? {
            Ok(data) => Btf::parse_base(data, base_origin)?,
            Err(path) => return Err(BtfError::KernelBtfMissing { path }),
        };
        if module == "vmlinux" {
            return Ok(base);
        }
        if module.is_empty() || module == "." || module == ".." || module.contains('/') {
            return Err(BtfError::BadModuleName {
                module: module.to_owned(),
            });
        }
        match read(dir.join(module))? {
            Ok(data) => base.add_split(data, format!("BTF of module {module:?}")),
            Err(path) => Err(BtfError::ModuleBtfMissing {
                module: module.to_owned(),
                path,
            }),
        }
    }

    fn parse_base(data: Vec<u8>, origin: String) -> Result<Btf, BtfError> {
        let (part, parsed) = parse_part(data, &origin, 1, false)?;
        let mut types = Vec::with_capacity(parsed.len() + 1);
        types.push(VOID);
        types.extend(parsed);
        let btf = Btf {
            origin,
            base_types: types.len(),
            types,
            base: part,
            split: None,
        };
        btf.validate(1)?;
        Ok(btf)
    }

    fn add_split(mut self, data: Vec<u8>, origin: String) -> Result<Btf, BtfError> {
        if self.split.is_some() {
            return Err(BtfError::NestedSplit {
                origin: self.origin,
            });
        }
        let (part, parsed) = parse_part(data, &origin, self.types.len(), true)?;
        self.types.extend(parsed);
        self.split = Some(part);
        self.origin = origin;
        self.validate(self.base_types)?;
        Ok(self)
    }

    /// Names this BTF in error messages (such as `BTF of module "wireguard"`).
    pub fn with_origin(mut self, origin: impl Into<String>) -> Btf {
        self.origin = origin.into();
        self
    }

    /// What this BTF is called in error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of types, void included: one past the last type id.
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// For split BTF, its first type id (the number of base types, void included).
    pub fn split_start(&self) -> Option<u32> {
        self.split
            .as_ref()
            .and_then(|_| u32::try_from(self.base_types).ok())
    }

    /// The `FUNC` named `name`, looked up in the split part first.
    pub fn function(&self, name: &str) -> Result<Function, BtfError> {
        let id =
            self.find(name, |kind| kind == Kind::Func)
                .ok_or_else(|| BtfError::NoFunction {
                    origin: self.origin.clone(),
                    name: name.to_owned(),
                })?;
        let func = self.get(id)?;
        let proto_id = func.size_or_type;
        let proto = self.get(proto_id)?;
        if proto.kind != Kind::FuncProto {
            return Err(self.malformed(format!(
                "function {name} (type {id}) has type {proto_id}, a {}, not a FUNC_PROTO",
                proto.kind
            )));
        }
        let mut params = Vec::with_capacity(usize::from(proto.vlen));
        let mut variadic = false;
        for i in 0..usize::from(proto.vlen) {
            let (name_off, type_id) = self.param(proto_id, proto, i)?;
            if i + 1 == usize::from(proto.vlen) && name_off == 0 && type_id == 0 {
                variadic = true;
            } else {
                params.push(Param {
                    name: self.name(name_off),
                    type_id,
                });
            }
        }
        Ok(Function {
            id,
            name: name.to_owned(),
            params,
            return_type: proto.size_or_type,
            variadic,
        })
    }

    /// Where the member at `path` lies in the struct (or union) `struct_name`: `["handshake",
    /// "remote_static"]` is member `remote_static` of member `handshake`. Members of anonymous
    /// struct and union members are found as if they were the container's own (C's rule), their
    /// offsets added. Pointers are not followed: a member of a pointed-to struct is a separate
    /// lookup (and read). Bitfields and members not on a byte boundary are errors.
    pub fn member(&self, struct_name: &str, path: &[&str]) -> Result<Member, BtfError> {
        let root = self
            .find(struct_name, |kind| {
                matches!(kind, Kind::Struct | Kind::Union)
            })
            .ok_or_else(|| BtfError::NoStruct {
                origin: self.origin.clone(),
                name: struct_name.to_owned(),
            })?;
        let mut shown = struct_name.to_owned();
        let mut bits = 0u64;
        let mut type_id = root;
        for field in path {
            let container = self.skip_modifiers(type_id)?;
            let kind = self.get(container)?.kind;
            if !matches!(kind, Kind::Struct | Kind::Union) {
                return Err(BtfError::NotComposite {
                    origin: self.origin.clone(),
                    path: shown,
                    ty: self.describe(type_id),
                    member: (*field).to_owned(),
                });
            }
            let mut budget = ANON_BUDGET;
            let found = if field.is_empty() {
                None
            } else {
                self.find_member(container, field, 0, &mut budget)?
            };
            let Some(found) = found else {
                return Err(BtfError::NoMember {
                    origin: self.origin.clone(),
                    path: shown,
                    ty: self.describe(type_id),
                    member: (*field).to_owned(),
                });
            };
            shown.push('.');
            shown.push_str(field);
            if found.bitfield_size != 0 || self.is_int_bitfield(found.type_id)? {
                return Err(BtfError::Bitfield {
                    origin: self.origin.clone(),
                    path: shown,
                });
            }
            if found.bits % 8 != 0 {
                return Err(BtfError::Unaligned {
                    origin: self.origin.clone(),
                    path: shown,
                    bits: found.bits,
                });
            }
            bits += found.bits;
            type_id = found.type_id;
        }
        let offset = u32::try_from(bits / 8)
            .map_err(|_| self.malformed(format!("{shown} lies more than 4 GiB into its struct")))?;
        Ok(Member { offset, type_id })
    }

    /// The size in bytes of a type, through typedefs and modifiers (a pointer is 8 bytes, an
    /// array its element's size times its length).
    pub fn size_of(&self, type_id: u32) -> Result<u32, BtfError> {
        let mut id = type_id;
        let mut count = 1u64;
        for _ in 0..=MAX_DEPTH {
            let t = self.get(id)?;
            let size = match t.kind {
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec => u64::from(t.size_or_type),
                Kind::Ptr => PTR_SIZE,
                Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::TypeTag
                | Kind::Var => {
                    id = t.size_or_type;
                    continue;
                }
                Kind::Array => {
                    let (elem, _, nelems) = self.array(id, t)?;
                    count = count.saturating_mul(u64::from(nelems));
                    id = elem;
                    continue;
                }
                Kind::Void | Kind::Fwd | Kind::Func | Kind::FuncProto | Kind::DeclTag => {
                    return Err(BtfError::NoSize {
                        origin: self.origin.clone(),
                        id: type_id,
                        ty: self.describe(type_id),
                    });
                }
            };
            return u32::try_from(count.saturating_mul(size)).map_err(|_| BtfError::TooLarge {
                origin: self.origin.clone(),
                id: type_id,
                ty: self.describe(type_id),
            });
        }
        Err(self.too_deep(type_id))
    }

    /// A C-like spelling of a type, for messages: `struct wg_peer *`, `u8[32]`, `__le32`.
    /// Invalid ids and reference cycles show as `<...>` in the text.
    pub fn describe(&self, type_id: u32) -> String {
        let mut budget = DESCRIBE_BUDGET;
        self.describe_with(type_id, &mut budget)
    }

    /// For a pointer to a struct (typedefs and modifiers skipped on both sides of the
    /// pointer), the struct's name. A forward-declared struct counts.
    pub fn pointee_struct(&self, type_id: u32) -> Option<String> {
        let ptr = self.get(self.skip_modifiers(type_id).ok()?).ok()?;
        if ptr.kind != Kind::Ptr {
            return None;
        }
        let target = self.get(self.skip_modifiers(ptr.size_or_type).ok()?).ok()?;
        let is_struct = match target.kind {
            Kind::Struct => true,
            Kind::Fwd => !target.kind_flag,
            _ => false,
        };
        let name = self.name(target.name_off);
        (is_struct && !name.is_empty()).then_some(name)
    }

    fn get(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(usize_of(id))
            .ok_or_else(|| BtfError::NoType {
                origin: self.origin.clone(),
                id,
                count: self.types.len(),
            })
    }

    fn malformed(&self, reason: String) -> BtfError {
        BtfError::Malformed {
            origin: self.origin.clone(),
            reason,
        }
    }

    fn too_deep(&self, id: u32) -> BtfError {
        BtfError::TooDeep {
            origin: self.origin.clone(),
            id,
        }
    }

    fn base_str_len(&self) -> usize {
        self.base.strings.len()
    }

    fn str_len(&self) -> usize {
        self.base_str_len() + self.split.as_ref().map_or(0, |s| s.strings.len())
    }

    /// The strings from `off` on (in the base's strings, or past them the split's).
    fn str_tail(&self, off: u32) -> Option<&[u8]> {
        let off = usize_of(off);
        let base_len = self.base_str_len();
        if off < base_len {
            self.base.strings().get(off..)
        } else {
            self.split.as_ref()?.strings().get(off - base_len..)
        }
    }

    /// The NUL-terminated string at `off`.
    fn str_bytes(&self, off: u32) -> Option<&[u8]> {
        let tail = self.str_tail(off)?;
        let end = tail.iter().position(|&b| b == 0)?;
        tail.get(..end)
    }

    fn name_is(&self, off: u32, name: &str) -> bool {
        let name = name.as_bytes();
        self.str_tail(off)
            .is_some_and(|tail| tail.get(name.len()) == Some(&0) && tail.starts_with(name))
    }

    fn name(&self, off: u32) -> String {
        String::from_utf8_lossy(self.str_bytes(off).unwrap_or_default()).into_owned()
    }

    /// The first type of a wanted kind named `name`, split part first.
    fn find(&self, name: &str, want: impl Fn(Kind) -> bool) -> Option<u32> {
        let split = self.base_types..self.types.len();
        let base = 1..self.base_types;
        split
            .chain(base)
            .find(|&id| {
                self.types
                    .get(id)
                    .is_some_and(|t| want(t.kind) && self.name_is(t.name_off, name))
            })
            .and_then(|id| u32::try_from(id).ok())
    }

    /// The `index`th `size`-byte record of the kind-specific data of type `id`.
    fn record(&self, id: u32, t: &Type, index: usize, size: usize) -> Option<&[u8]> {
        let part = if usize_of(id) < self.base_types {
            &self.base
        } else {
            self.split.as_ref()?
        };
        let start = usize_of(t.extra).checked_add(index.checked_mul(size)?)?;
        part.type_section().get(start..start.checked_add(size)?)
    }

    fn record_u32(
        &self,
        id: u32,
        t: &Type,
        index: usize,
        size: usize,
        field: usize,
    ) -> Option<u32> {
        le_u32(self.record(id, t, index, size)?, field * 4)
    }

    fn truncated(&self, id: u32) -> BtfError {
        self.malformed(format!("the data of type {id} is truncated"))
    }

    /// (element type, index type, number of elements) of an array.
    fn array(&self, id: u32, t: &Type) -> Result<(u32, u32, u32), BtfError> {
        let field = |i| {
            self.record_u32(id, t, 0, 12, i)
                .ok_or_else(|| self.truncated(id))
        };
        Ok((field(0)?, field(1)?, field(2)?))
    }

    /// (name offset, type) of a parameter of a function prototype.
    fn param(&self, id: u32, t: &Type, index: usize) -> Result<(u32, u32), BtfError> {
        let field = |i| {
            self.record_u32(id, t, index, 8, i)
                .ok_or_else(|| self.truncated(id))
        };
        Ok((field(0)?, field(1)?))
    }

    fn raw_member(&self, id: u32, t: &Type, index: usize) -> Result<RawMember, BtfError> {
        let field = |i| {
            self.record_u32(id, t, index, 12, i)
                .ok_or_else(|| self.truncated(id))
        };
        let offset = field(2)?;
        let (bit_offset, bitfield_size) = if t.kind_flag {
            (offset & 0x00ff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(RawMember {
            name_off: field(0)?,
            type_id: field(1)?,
            bit_offset,
            bitfield_size,
        })
    }

    /// Checks the string offsets and type references of types `from..`.
    fn validate(&self, from: usize) -> Result<(), BtfError> {
        let count = self.types.len();
        let str_len = self.str_len();
        let check_str = |id: usize, off: u32| {
            if usize_of(off) < str_len {
                Ok(())
            } else {
                Err(self.malformed(format!(
                    "type {id} has a name at string offset {off}, past the strings' {str_len} \
                     bytes"
                )))
            }
        };
        let check_ref = |id: usize, kind: Kind, target: u32| {
            if usize_of(target) < count {
                Ok(())
            } else {
                Err(self.malformed(format!(
                    "type {id} ({kind}) refers to type {target}, but there are only {count} types"
                )))
            }
        };
        for (id, t) in self.types.iter().enumerate().skip(from) {
            check_str(id, t.name_off)?;
            if t.kind.refers_by_type() {
                check_ref(id, t.kind, t.size_or_type)?;
            }
            // Per record of kind data: its size, where names are, where type ids are.
            let (size, names, refs): (usize, &[usize], &[usize]) = match t.kind {
                Kind::Array => (12, &[], &[0, 4]),
                Kind::Struct | Kind::Union => (12, &[0], &[4]),
                Kind::FuncProto => (8, &[0], &[4]),
                Kind::Enum => (8, &[0], &[]),
                Kind::Enum64 => (12, &[0], &[]),
                Kind::Datasec => (12, &[], &[0]),
                _ => continue,
            };
            // Type ids fit in u32: parse_part refuses more.
            let id32 = u32::try_from(id).unwrap_or(u32::MAX);
            let records = self
                .record(id32, t, 0, t.kind.extra_len(usize::from(t.vlen)))
                .ok_or_else(|| self.truncated(id32))?;
            for record in records.chunks_exact(size) {
                for &at in names {
                    check_str(id, le_u32(record, at).unwrap_or(u32::MAX))?;
                }
                for &at in refs {
                    check_ref(id, t.kind, le_u32(record, at).unwrap_or(u32::MAX))?;
                }
            }
        }
        Ok(())
    }

    /// Follows typedefs, const, volatile, restrict and type tags.
    fn skip_modifiers(&self, type_id: u32) -> Result<u32, BtfError> {
        let mut id = type_id;
        for _ in 0..=MAX_DEPTH {
            let t = self.get(id)?;
            match t.kind {
                Kind::Typedef | Kind::Const | Kind::Volatile | Kind::Restrict | Kind::TypeTag => {
                    id = t.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(self.too_deep(type_id))
    }

    /// An old-style bitfield: an INT narrower than its size, or not at its start.
    fn is_int_bitfield(&self, type_id: u32) -> Result<bool, BtfError> {
        let id = self.skip_modifiers(type_id)?;
        let t = self.get(id)?;
        if t.kind != Kind::Int {
            return Ok(false);
        }
        let encoding = self
            .record_u32(id, t, 0, 4, 0)
            .ok_or_else(|| self.truncated(id))?;
        let (bits, offset) = (encoding & 0xff, (encoding >> 16) & 0xff);
        Ok(offset != 0 || u64::from(bits) != u64::from(t.size_or_type) * 8)
    }

    /// Member `name` of the struct or union `container`, looking into anonymous members.
    fn find_member(
        &self,
        container: u32,
        name: &str,
        depth: usize,
        budget: &mut u32,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH || *budget == 0 {
            return Err(self.too_deep(container));
        }
        *budget -= 1;
        let c = self.get(container)?;
        for i in 0..usize::from(c.vlen) {
            let m = self.raw_member(container, c, i)?;
            if self.name_is(m.name_off, name) {
                return Ok(Some(Found {
                    bits: u64::from(m.bit_offset),
                    type_id: m.type_id,
                    bitfield_size: m.bitfield_size,
                }));
            }
            if !self.str_bytes(m.name_off).unwrap_or_default().is_empty() {
                continue;
            }
            let inner = self.skip_modifiers(m.type_id)?;
            if !matches!(self.get(inner)?.kind, Kind::Struct | Kind::Union) {
                continue;
            }
            if let Some(found) = self.find_member(inner, name, depth + 1, budget)? {
                return Ok(Some(Found {
                    bits: found.bits + u64::from(m.bit_offset),
                    ..found
                }));
            }
        }
        Ok(None)
    }

    fn describe_with(&self, type_id: u32, budget: &mut u32) -> String {
        if *budget == 0 {
            return "<...>".to_owned();
        }
        *budget -= 1;
        let Ok(t) = self.get(type_id) else {
            return format!("<no type {type_id}>");
        };
        let name = self.name(t.name_off);
        let named = |prefix: &str| {
            if name.is_empty() {
                format!("{prefix}<anonymous>")
            } else {
                format!("{prefix}{name}")
            }
        };
        match t.kind {
            Kind::Void => "void".to_owned(),
            Kind::Int | Kind::Float | Kind::Typedef => named(""),
            Kind::Struct => named("struct "),
            Kind::Union => named("union "),
            Kind::Enum | Kind::Enum64 => named("enum "),
            Kind::Fwd if t.kind_flag => named("union "),
            Kind::Fwd => named("struct "),
            Kind::Ptr => {
                let target = t.size_or_type;
                if let Ok(proto) = self.get(target)
                    && proto.kind == Kind::FuncProto
                {
                    return self.describe_proto(target, proto, "(*)", budget);
                }
                let inner = self.describe_with(target, budget);
                if inner.ends_with('*') {
                    format!("{inner}*")
                } else {
                    format!("{inner} *")
                }
            }
            Kind::Array => {
                let mut dims = String::new();
                let (mut id, mut array) = (type_id, *t);
                loop {
                    let Ok((elem, _, nelems)) = self.array(id, &array) else {
                        return format!("<truncated array {id}>");
                    };
                    dims.push_str(&format!("[{nelems}]"));
                    match self.get(elem) {
                        Ok(next) if next.kind == Kind::Array && *budget > 0 => {
                            *budget -= 1;
                            (id, array) = (elem, *next);
                        }
                        _ => return format!("{}{dims}", self.describe_with(elem, budget)),
                    }
                }
            }
            Kind::Const | Kind::Volatile | Kind::Restrict => {
                let qualifier = match t.kind {
                    Kind::Const => "const",
                    Kind::Volatile => "volatile",
                    _ => "restrict",
                };
                let on_pointer = self
                    .get(t.size_or_type)
                    .is_ok_and(|inner| inner.kind == Kind::Ptr);
                let inner = self.describe_with(t.size_or_type, budget);
                if on_pointer || t.kind == Kind::Restrict {
                    format!("{inner} {qualifier}")
                } else {
                    format!("{qualifier} {inner}")
                }
            }
            Kind::TypeTag => self.describe_with(t.size_or_type, budget),
            Kind::Func => match self.get(t.size_or_type) {
                Ok(proto) if proto.kind == Kind::FuncProto => {
                    self.describe_proto(t.size_or_type, proto, &name, budget)
                }
                _ => format!("<function {name} without a prototype>"),
            },
            Kind::FuncProto => self.describe_proto(type_id, t, "", budget),
            Kind::Var => format!("{} {name}", self.describe_with(t.size_or_type, budget)),
            Kind::Datasec => format!("section {name}"),
            Kind::DeclTag => format!("decl_tag {name}"),
        }
    }

    /// `ret name(type param, ...)`.
    fn describe_proto(&self, id: u32, proto: &Type, name: &str, budget: &mut u32) -> String {
        let ret = self.describe_with(proto.size_or_type, budget);
        let mut params = Vec::new();
        for i in 0..usize::from(proto.vlen) {
            if *budget == 0 {
                params.push("<...>".to_owned());
                break;
            }
            let Ok((name_off, type_id)) = self.param(id, proto, i) else {
                params.push("<truncated>".to_owned());
                break;
            };
            if type_id == 0 {
                params.push("...".to_owned());
                continue;
            }
            let ty = self.describe_with(type_id, budget);
            let param = self.name(name_off);
            params.push(match (param.is_empty(), ty.ends_with('*')) {
                (true, _) => ty,
                (false, true) => format!("{ty}{param}"),
                (false, false) => format!("{ty} {param}"),
            });
        }
        let params = if params.is_empty() {
            "void".to_owned()
        } else {
            params.join(", ")
        };
        format!("{ret} {name}({params})")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use proptest::{
        prelude::*,
        test_runner::{Config, RngSeed},
    };

    use super::*;

    pub(crate) const INT: u32 = 1;
    pub(crate) const PTR: u32 = 2;
    pub(crate) const ARRAY: u32 = 3;
    pub(crate) const STRUCT: u32 = 4;
    pub(crate) const UNION: u32 = 5;
    const ENUM: u32 = 6;
    const TYPEDEF: u32 = 8;
    const CONST: u32 = 10;
    pub(crate) const FUNC: u32 = 12;
    pub(crate) const FUNC_PROTO: u32 = 13;

    /// Writes BTF blobs: base, or split over a base (string offsets and type ids continue the
    /// base's, and a name the base already has is referred to by its base offset, as pahole does).
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        base_strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        pub(crate) fn base() -> Builder {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                base_strings: Vec::new(),
                next_id: 1,
            }
        }

        pub(crate) fn split_over(base: &Btf) -> Builder {
            Builder {
                types: Vec::new(),
                strings: Vec::new(),
                base_strings: base.base.strings().to_vec(),
                next_id: u32::try_from(base.type_count()).expect("type count"),
            }
        }

        fn find_str(strings: &[u8], s: &str) -> Option<usize> {
            let mut off = 0;
            for chunk in strings.split(|&b| b == 0) {
                if chunk == s.as_bytes() {
                    return Some(off);
                }
                off += chunk.len() + 1;
            }
            None
        }

        pub(crate) fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = Builder::find_str(&self.base_strings, s)
                .or_else(|| {
                    Builder::find_str(&self.strings, s).map(|off| self.base_strings.len() + off)
                })
                .unwrap_or_else(|| {
                    let off = self.base_strings.len() + self.strings.len();
                    self.strings.extend_from_slice(s.as_bytes());
                    self.strings.push(0);
                    off
                });
            u32::try_from(off).expect("string offset")
        }

        pub(crate) fn raw(
            &mut self,
            name_off: u32,
            info: u32,
            size_or_type: u32,
            extra: &[u32],
        ) -> u32 {
            for word in [name_off, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        pub(crate) fn ty(
            &mut self,
            name: &str,
            kind: u32,
            vlen: usize,
            size_or_type: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = kind << 24 | u32::try_from(vlen).expect("vlen");
            self.raw(name_off, info, size_or_type, extra)
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            self.ty(name, INT, 0, size, &[size * 8])
        }

        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.ty("", PTR, 0, to, &[])
        }

        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.ty(name, TYPEDEF, 0, to, &[])
        }

        pub(crate) fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
            self.ty("", ARRAY, 0, 0, &[elem, index, nelems])
        }

        /// Members are (name, type, offset word): the bit offset, or with `kind_flag` the
        /// bitfield size in the high 8 bits.
        pub(crate) fn composite(
            &mut self,
            kind: u32,
            kind_flag: bool,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(member, ty, offset) in members {
                extra.extend([self.str(member), ty, offset]);
            }
            let name_off = self.str(name);
            let info = kind << 24
                | u32::from(kind_flag) << 31
                | u32::try_from(members.len()).expect("vlen");
            self.raw(name_off, info, size, &extra)
        }

        pub(crate) fn strukt(
            &mut self,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            self.composite(STRUCT, false, name, size, members)
        }

        pub(crate) fn proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
            let mut extra = Vec::new();
            for &(param, ty) in params {
                extra.extend([self.str(param), ty]);
            }
            self.ty("", FUNC_PROTO, params.len(), ret, &extra)
        }

        pub(crate) fn func(&mut self, name: &str, proto: u32) -> u32 {
            // vlen is the linkage: 1, global.
            self.ty(name, FUNC, 1, proto, &[])
        }

        pub(crate) fn finish(&self) -> Vec<u8> {
            let mut out = Vec::new();
            let type_len = u32::try_from(self.types.len()).expect("type_len");
            let str_len = u32::try_from(self.strings.len()).expect("str_len");
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for word in [24, 0, type_len, type_len, str_len] {
                out.extend_from_slice(&u32::to_le_bytes(word));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    // Base ids.
    pub(crate) const UCHAR: u32 = 1;
    pub(crate) const U8: u32 = 2;
    pub(crate) const U16: u32 = 4;
    pub(crate) const U32: u32 = 6;
    pub(crate) const LE32: u32 = 7;
    pub(crate) const U64: u32 = 9;
    pub(crate) const HLIST_NODE: u32 = 10;
    const HLIST_NODE_PTR_PTR: u32 = 12;
    const BASE_INSERT: u32 = 15;
    const BASE_TYPES: u32 = 16;
    // Split ids.
    const INDEX_HASHTABLE: u32 = 16;
    const ENTRY: u32 = 18;
    const PEER_PTR: u32 = 19;
    const PEER: u32 = 20;
    const DEVICE_PTR: u32 = 21;
    const DEVICE: u32 = 22;
    const ANON_UNION: u32 = 24;
    const HANDSHAKE: u32 = 26;
    const REMOTE_STATIC: u32 = 27;
    const VOID_PTR: u32 = 28;
    const TABLE_PTR: u32 = 29;
    const ENTRY_PTR: u32 = 30;
    const INSERT_PROTO: u32 = 31;
    const INSERT: u32 = 32;

    pub(crate) fn base_blob() -> Vec<u8> {
        let mut b = Builder::base();
        assert_eq!(b.int("unsigned char", 1), UCHAR);
        assert_eq!(b.typedef("u8", UCHAR), U8);
        let ushort = b.int("short unsigned int", 2);
        assert_eq!(b.typedef("u16", ushort), U16);
        let uint = b.int("unsigned int", 4);
        assert_eq!(b.typedef("u32", uint), U32);
        assert_eq!(b.typedef("__le32", U32), LE32);
        let ulong = b.int("long long unsigned int", 8);
        assert_eq!(b.typedef("u64", ulong), U64);
        let node = b.strukt(
            "hlist_node",
            16,
            &[("next", HLIST_NODE + 1, 0), ("pprev", HLIST_NODE + 2, 64)],
        );
        assert_eq!(node, HLIST_NODE);
        b.ptr(HLIST_NODE);
        assert_eq!(b.ptr(HLIST_NODE + 1), HLIST_NODE_PTR_PTR);
        let int = b.int("int", 4);
        let proto = b.proto(int, &[]);
        // A decoy: the split's function of the same name must win.
        assert_eq!(b.func("wg_index_hashtable_insert", proto), BASE_INSERT);
        assert_eq!(b.next_id, BASE_TYPES);
        b.finish()
    }

    /// Mimics the wireguard module's BTF (simplified layouts).
    fn split_blob(base: &Btf) -> Vec<u8> {
        let mut b = Builder::split_over(base);
        let int = 13;
        assert_eq!(
            b.strukt("index_hashtable", 8, &[("seed", U64, 0)]),
            INDEX_HASHTABLE
        );
        let values = [
            b.str("INDEX_HASHTABLE_HANDSHAKE"),
            1,
            b.str("INDEX_HASHTABLE_KEYPAIR"),
            2,
        ];
        let kind = b.ty("index_hashtable_type", ENUM, 2, 4, &values);
        let entry = b.strukt(
            "index_hashtable_entry",
            32,
            &[
                ("peer", PEER_PTR, 0),
                ("index_hash", HLIST_NODE, 64),
                ("type", kind, 192),
                ("index", LE32, 224),
            ],
        );
        assert_eq!(entry, ENTRY);
        assert_eq!(b.ptr(PEER), PEER_PTR);
        // kind_flag: offsets are bitfield size << 24 | bit offset.
        let peer = b.composite(
            STRUCT,
            true,
            "wg_peer",
            104,
            &[
                ("device", DEVICE_PTR, 0),
                ("", ANON_UNION, 64),
                ("is_dead", U8, 1 << 24 | 128),
                ("handshake", HANDSHAKE, 192),
            ],
        );
        assert_eq!(peer, PEER);
        assert_eq!(b.ptr(DEVICE), DEVICE_PTR);
        let legacy_bits = DEVICE + 1;
        let device = b.strukt(
            "wg_device",
            48,
            &[
                ("dev", VOID_PTR, 0),
                ("incoming_port", U16, 320),
                ("legacy_bits", legacy_bits, 336),
                ("odd", U8, 340),
            ],
        );
        assert_eq!(device, DEVICE);
        // An old-style bitfield: a 3-bit INT.
        assert_eq!(b.ty("unsigned int", INT, 0, 4, &[3]), legacy_bits);
        let union = b.composite(
            UNION,
            false,
            "",
            8,
            &[("", ANON_UNION + 1, 0), ("whole", U64, 0)],
        );
        assert_eq!(union, ANON_UNION);
        b.strukt("", 8, &[("serial_work_cpu", U32, 0), ("rx_port", U16, 32)]);
        let handshake = b.strukt(
            "noise_handshake",
            80,
            &[
                ("entry", ENTRY, 0),
                ("state", U32, 256),
                ("remote_static", REMOTE_STATIC, 288),
                ("last_initiation", U64, 576),
            ],
        );
        assert_eq!(handshake, HANDSHAKE);
        assert_eq!(b.array(U8, int, 32), REMOTE_STATIC);
        assert_eq!(b.ptr(0), VOID_PTR);
        assert_eq!(b.ptr(INDEX_HASHTABLE), TABLE_PTR);
        assert_eq!(b.ptr(ENTRY), ENTRY_PTR);
        let proto = b.proto(LE32, &[("table", TABLE_PTR), ("entry", ENTRY_PTR)]);
        assert_eq!(proto, INSERT_PROTO);
        assert_eq!(b.func("wg_index_hashtable_insert", proto), INSERT);
        b.finish()
    }

    pub(crate) fn wireguard() -> Btf {
        let base = Btf::parse(&base_blob()).expect("base");
        let split = split_blob(&base);
        Btf::parse_split(base, &split)
            .expect("split")
            .with_origin("BTF of module \"wireguard\"")
    }

    fn member(btf: &Btf, name: &str, path: &[&str]) -> (u32, u32) {
        let m = btf.member(name, path).expect("member");
        (m.offset, m.type_id)
    }

    #[test]
    fn split_numbering_continues_the_base() {
        let base = Btf::parse(&base_blob()).expect("base");
        assert_eq!(base.type_count(), 16);
        assert_eq!(base.split_start(), None);
        let base_str_len = base.base_str_len();
        let btf = wireguard();
        assert_eq!(btf.split_start(), Some(BASE_TYPES));
        assert_eq!(btf.type_count(), 33);
        // The split's own names lie past the base's strings; a name the base has is shared.
        let peer = btf.types[PEER as usize];
        assert!(peer.name_off as usize >= base_str_len);
        assert_eq!(btf.name(peer.name_off), "wg_peer");
        let insert = btf.types[INSERT as usize];
        assert_eq!(insert.name_off, base.types[BASE_INSERT as usize].name_off);
        assert!((insert.name_off as usize) < base_str_len);
        assert_eq!(btf.name(insert.name_off), "wg_index_hashtable_insert");
    }

    #[test]
    fn functions_are_found_in_the_split_part_first() {
        let btf = wireguard();
        let insert = btf.function("wg_index_hashtable_insert").expect("function");
        assert_eq!(
            insert,
            Function {
                id: INSERT,
                name: "wg_index_hashtable_insert".to_owned(),
                params: vec![
                    Param {
                        name: "table".to_owned(),
                        type_id: TABLE_PTR
                    },
                    Param {
                        name: "entry".to_owned(),
                        type_id: ENTRY_PTR
                    },
                ],
                return_type: LE32,
                variadic: false,
            }
        );
        assert_eq!(btf.describe(insert.return_type), "__le32");
        assert_eq!(btf.size_of(insert.return_type).expect("size"), 4);
        assert_eq!(btf.describe(TABLE_PTR), "struct index_hashtable *");
        assert_eq!(
            btf.pointee_struct(ENTRY_PTR).as_deref(),
            Some("index_hashtable_entry")
        );
        assert_eq!(
            btf.describe(INSERT),
            "__le32 wg_index_hashtable_insert(struct index_hashtable *table, struct \
             index_hashtable_entry *entry)"
        );
        assert_eq!(
            btf.describe(INSERT_PROTO),
            "__le32 (struct index_hashtable *table, struct index_hashtable_entry *entry)"
        );

        let base = Btf::parse(&base_blob()).expect("base");
        let decoy = base
            .function("wg_index_hashtable_insert")
            .expect("base function");
        assert_eq!((decoy.id, decoy.params.len()), (BASE_INSERT, 0));
        assert_eq!(
            base.describe(BASE_INSERT),
            "int wg_index_hashtable_insert(void)"
        );

        let err = btf
            .function("wg_packet_receive")
            .expect_err("no such function");
        assert_eq!(
            err.to_string(),
            "BTF of module \"wireguard\" has no function wg_packet_receive"
        );
        // Only FUNCs are functions.
        assert!(btf.function("wg_peer").is_err());
    }

    #[test]
    fn member_offsets_nest_and_see_through_anonymous_members() {
        let btf = wireguard();
        assert_eq!(
            member(&btf, "index_hashtable_entry", &["peer"]),
            (0, PEER_PTR)
        );
        assert_eq!(btf.describe(PEER_PTR), "struct wg_peer *");
        assert_eq!(btf.pointee_struct(PEER_PTR).as_deref(), Some("wg_peer"));
        assert_eq!(
            member(&btf, "index_hashtable_entry", &["index"]),
            (28, LE32)
        );
        assert_eq!(member(&btf, "wg_peer", &["device"]), (0, DEVICE_PTR));
        assert_eq!(btf.pointee_struct(DEVICE_PTR).as_deref(), Some("wg_device"));
        assert_eq!(member(&btf, "wg_device", &["incoming_port"]), (40, U16));
        assert_eq!(btf.describe(U16), "u16");
        assert_eq!(btf.size_of(U16).expect("size"), 2);
        let (offset, ty) = member(&btf, "wg_peer", &["handshake", "remote_static"]);
        assert_eq!((offset, ty), (24 + 36, REMOTE_STATIC));
        assert_eq!(btf.describe(ty), "u8[32]");
        assert_eq!(btf.size_of(ty).expect("size"), 32);
        assert_eq!(
            member(&btf, "wg_peer", &["handshake", "entry", "index"]),
            (24 + 28, LE32)
        );
        // Inside the anonymous union at byte 8, and the anonymous struct inside it.
        assert_eq!(member(&btf, "wg_peer", &["whole"]), (8, U64));
        assert_eq!(member(&btf, "wg_peer", &["serial_work_cpu"]), (8, U32));
        assert_eq!(member(&btf, "wg_peer", &["rx_port"]), (12, U16));
        assert_eq!(btf.describe(ANON_UNION), "union <anonymous>");
        assert_eq!(member(&btf, "wg_peer", &[]), (0, PEER));
    }

    #[test]
    fn member_errors_say_what_is_wrong() {
        let btf = wireguard();
        let err =
            |name: &str, path: &[&str]| btf.member(name, path).expect_err("must fail").to_string();
        assert_eq!(
            err("wg_peer", &["is_dead"]),
            "BTF of module \"wireguard\": wg_peer.is_dead is a bitfield; only whole-byte members \
             can be read"
        );
        assert!(err("wg_device", &["legacy_bits"]).contains("wg_device.legacy_bits is a bitfield"));
        assert_eq!(
            err("wg_device", &["odd"]),
            "BTF of module \"wireguard\": wg_device.odd starts at bit 340, not on a byte boundary"
        );
        assert_eq!(
            err("wg_peer", &["device", "incoming_port"]),
            "BTF of module \"wireguard\": wg_peer.device is struct wg_device *, not a struct or \
             union, so it has no member \"incoming_port\""
        );
        assert_eq!(
            err("wg_peer", &["handshake", "remote_ephemeral"]),
            "BTF of module \"wireguard\": wg_peer.handshake (struct noise_handshake) has no \
             member \"remote_ephemeral\""
        );
        assert!(err("wg_peer", &[""]).contains("has no member \"\""));
        assert_eq!(
            err("wg_socket", &["sock4"]),
            "BTF of module \"wireguard\" has no struct or union wg_socket"
        );
    }

    #[test]
    fn sizes_and_descriptions_follow_typedefs_pointers_and_arrays() {
        let btf = wireguard();
        assert_eq!(btf.size_of(LE32).expect("size"), 4);
        assert_eq!(btf.describe(LE32), "__le32");
        assert_eq!(btf.size_of(PEER).expect("size"), 104);
        assert_eq!(btf.size_of(PEER_PTR).expect("size"), 8);
        assert_eq!(btf.describe(HLIST_NODE_PTR_PTR), "struct hlist_node **");
        assert_eq!(btf.describe(VOID_PTR), "void *");
        assert_eq!(btf.describe(0), "void");
        assert_eq!(btf.describe(999), "<no type 999>");
        assert!(btf.size_of(0).is_err());
        assert!(btf.size_of(INSERT).is_err());
        assert!(btf.pointee_struct(U8).is_none());
        assert!(btf.pointee_struct(VOID_PTR).is_none());
        assert_eq!(
            btf.size_of(999).expect_err("no type").to_string(),
            "BTF of module \"wireguard\" has no type 999 (it has 33 types)"
        );

        // Two-dimensional, const, through a typedef.
        let mut b = Builder::base();
        let uchar = b.int("unsigned char", 1);
        let u8_ = b.typedef("u8", uchar);
        let row = b.array(u8_, uchar, 4);
        let grid = b.array(row, uchar, 2);
        let cu8 = b.ty("", CONST, 0, u8_, &[]);
        let cptr = b.ptr(cu8);
        let ptr_const = b.ty("", CONST, 0, cptr, &[]);
        let grid_t = b.typedef("grid_t", grid);
        let btf = Btf::parse(&b.finish()).expect("parse");
        assert_eq!(btf.describe(grid), "u8[2][4]");
        assert_eq!(btf.size_of(grid).expect("size"), 8);
        assert_eq!(btf.size_of(grid_t).expect("size"), 8);
        assert_eq!(btf.describe(cptr), "const u8 *");
        assert_eq!(btf.describe(ptr_const), "const u8 * const");
    }

    fn blob_with(build: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let mut b = Builder::base();
        build(&mut b);
        b.finish()
    }

    fn parse_err(data: &[u8]) -> String {
        Btf::parse(data).expect_err("must not parse").to_string()
    }

    #[test]
    fn hostile_headers_are_refused() {
        let valid = base_blob();
        assert_eq!(
            parse_err(&valid[..10]),
            "malformed base BTF: 10 bytes is shorter than the 24-byte BTF header"
        );
        assert!(parse_err(&[]).contains("shorter than the 24-byte BTF header"));
        assert_eq!(
            parse_err(b"\x7fELF and more bytes than a header"),
            "base BTF is not BTF: its magic is 0x457f, not 0xeb9f"
        );
        let mut swapped = valid.clone();
        swapped[..2].copy_from_slice(&MAGIC.to_be_bytes());
        assert!(parse_err(&swapped).contains("big-endian BTF"));
        let mut version = valid.clone();
        version[2] = 2;
        assert!(parse_err(&version).contains("version 2"));

        let mut long_types = valid.clone();
        long_types[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            parse_err(&long_types).contains("the type section (bytes 24..4294967319) extends past")
        );
        let mut long_strings = valid.clone();
        long_strings[20..24].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(parse_err(&long_strings).contains("the string section"));
        let mut short = valid.clone();
        short.truncate(valid.len() - 1);
        assert!(parse_err(&short).contains("string section"));
        let mut hdr_len = valid.clone();
        hdr_len[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(parse_err(&hdr_len).contains("header length 8"));
        // A 32-byte header: zeros past byte 24 are fine, anything else is a field we don't know.
        let mut longer = valid[..24].to_vec();
        longer[4..8].copy_from_slice(&32u32.to_le_bytes());
        longer.extend_from_slice(&[0; 8]);
        longer.extend_from_slice(&valid[24..]);
        assert!(Btf::parse(&longer).is_ok());
        longer[30] = 1;
        assert!(parse_err(&longer).contains("non-zero fields past the 24 bytes"));
    }

    #[test]
    fn hostile_types_are_refused() {
        // A member whose type id is past the last type.
        let data = blob_with(|b| {
            let int = b.int("int", 4);
            b.strukt("s", 8, &[("a", int, 0), ("b", 999, 32)]);
        });
        assert_eq!(
            parse_err(&data),
            "malformed base BTF: type 2 (STRUCT) refers to type 999, but there are only 3 types"
        );
        // A name past the strings.
        let data = blob_with(|b| {
            b.raw(10_000, INT << 24, 4, &[32]);
        });
        assert!(parse_err(&data).contains("type 1 has a name at string offset 10000"));
        // A member name past the strings.
        let data = blob_with(|b| {
            let int = b.int("int", 4);
            let name = b.str("s");
            b.raw(name, STRUCT << 24 | 1, 4, &[5_000, int, 0]);
        });
        assert!(parse_err(&data).contains("string offset 5000"));
        // An unknown kind.
        let data = blob_with(|b| {
            b.raw(0, 25 << 24, 0, &[]);
        });
        assert_eq!(
            parse_err(&data),
            "malformed base BTF: type 1 has unknown kind 25"
        );
        // Kind data past the type section: a struct claiming 3 members with room for 1.
        let data = blob_with(|b| {
            let int = b.int("int", 4);
            b.raw(0, STRUCT << 24 | 3, 4, &[0, int, 0]);
        });
        assert!(parse_err(&data).contains("type 2 at byte 16 of the type section is truncated"));

        // In split BTF: a reference past the split's last type.
        let base = Btf::parse(&base_blob()).expect("base");
        let mut b = Builder::split_over(&base);
        b.ptr(BASE_TYPES + 1);
        let err = Btf::parse_split(base, &b.finish()).expect_err("must not parse");
        assert_eq!(
            err.to_string(),
            "malformed split BTF: type 16 (PTR) refers to type 17, but there are only 17 types"
        );
        // Split over split.
        let btf = wireguard();
        let err = Btf::parse_split(btf, &Builder::base().finish()).expect_err("nested");
        assert!(
            err.to_string()
                .contains("split BTF over split BTF is not supported")
        );
    }

    #[test]
    fn reference_cycles_end_in_an_error() {
        let data = blob_with(|b| {
            b.typedef("loop_t", 1); // 1: itself
            b.ptr(2); // 2: itself
            b.ty("", CONST, 0, 3, &[]); // 3: itself
            b.strukt("s", 8, &[("t", 1, 0)]); // 4
            b.array(5, 5, 2); // 5: itself
            b.strukt("anon_loop", 8, &[("", 6, 0)]); // 6: contains itself, anonymously
        });
        let btf = Btf::parse(&data).expect("parse");
        for id in 1..=6 {
            // 2 is a pointer (8 bytes, whatever it points to); 4 and 6 are structs.
            if ![2, 4, 6].contains(&id) {
                let err = btf.size_of(id).expect_err("cycle").to_string();
                assert!(err.contains("a reference cycle?"), "{err}");
            }
            assert!(btf.describe(id).len() < 1024);
        }
        assert_eq!(btf.describe(1), "loop_t");
        assert!(btf.describe(2).contains("<...>"));
        assert!(btf.describe(5).contains("<...>"));
        assert!(btf.pointee_struct(2).is_none());
        assert!(btf.member("s", &["t", "x"]).is_err());
        let err = btf
            .member("anon_loop", &["x"])
            .expect_err("cycle")
            .to_string();
        assert!(err.contains("a reference cycle?"), "{err}");
    }

    #[test]
    fn describe_stays_short_on_wide_recursive_prototypes() {
        // A prototype of 60000 parameters, each a pointer to that same prototype.
        let data = blob_with(|b| {
            let params: Vec<(&str, u32)> = vec![("", 2); 60_000];
            b.proto(0, &params); // 1
            b.ptr(1); // 2
        });
        let btf = Btf::parse(&data).expect("parse");
        assert!(btf.describe(2).len() < 100_000);
    }

    #[test]
    fn from_kernel_names_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Btf::from_dir(dir.path(), "wireguard").expect_err("no vmlinux");
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
        std::fs::write(dir.path().join("vmlinux"), base_blob()).expect("write");
        let err = Btf::from_dir(dir.path(), "wireguard").expect_err("no module");
        let want = format!(
            "module BTF {}/wireguard is missing: module \"wireguard\" is not loaded (modprobe \
             wireguard), or the kernel was built without CONFIG_DEBUG_INFO_BTF_MODULES",
            dir.path().display()
        );
        assert_eq!(err.to_string(), want);
        for bad in ["", "..", "../vmlinux"] {
            let err = Btf::from_dir(dir.path(), bad).expect_err("bad name");
            assert!(matches!(err, BtfError::BadModuleName { .. }), "{err}");
        }
        let base = Btf::from_dir(dir.path(), "vmlinux").expect("vmlinux");
        assert!(base.origin().starts_with("kernel BTF "));
        std::fs::write(dir.path().join("wireguard"), split_blob(&base)).expect("write");
        let btf = Btf::from_dir(dir.path(), "wireguard").expect("module");
        assert_eq!(
            btf.function("wg_index_hashtable_insert").expect("fn").id,
            INSERT
        );
        assert_eq!(
            btf.function("nope").expect_err("none").to_string(),
            "BTF of module \"wireguard\" has no function nope"
        );
    }

    /// Every lookup, on whatever parsed.
    fn exercise(btf: &Btf) {
        for id in 0..u32::try_from(btf.type_count()).expect("count") + 2 {
            let _ = btf.size_of(id);
            let _ = btf.describe(id);
            let _ = btf.pointee_struct(id);
        }
        let _ = btf.function("wg_index_hashtable_insert");
        for (name, path) in [
            ("wg_peer", &["handshake", "remote_static"][..]),
            ("wg_peer", &["rx_port"]),
            ("wg_peer", &["is_dead"]),
            ("wg_device", &["odd"]),
            ("index_hashtable_entry", &["peer", "x"]),
        ] {
            let _ = btf.member(name, path);
        }
    }

    fn config() -> Config {
        let mut config = Config::default();
        if std::env::var_os("PROPTEST_CASES").is_none() {
            config.cases = 2_000;
        }
        if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
            config.rng_seed = RngSeed::Fixed(0x6274_6621);
        }
        config
    }

    fn mutate(
        mut data: Vec<u8>,
        bytes: &[(usize, u8)],
        words: &[(usize, u32)],
        cut: usize,
    ) -> Vec<u8> {
        for &(at, byte) in bytes {
            let len = data.len();
            data[at % len] = byte;
        }
        for &(at, word) in words {
            // Aligned words: header fields, type headers, member records.
            let at = (at % (data.len() / 4)) * 4;
            data[at..at + 4].copy_from_slice(&word.to_le_bytes());
        }
        let keep = data.len() - cut % 8;
        data.truncate(keep);
        data
    }

    fn small_word() -> impl Strategy<Value = u32> {
        prop_oneof![
            0..64u32,
            any::<u32>(),
            Just(u32::MAX),
            (0..20u32).prop_map(|k| k << 24 | 2)
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(btf) = Btf::parse(&data) {
                exercise(&btf);
            }
            let base = Btf::parse(&base_blob()).expect("base");
            if let Ok(btf) = Btf::parse_split(base, &data) {
                exercise(&btf);
            }
        }

        #[test]
        fn mutated_blobs_never_panic(
            split in any::<bool>(),
            bytes in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            words in proptest::collection::vec((any::<usize>(), small_word()), 0..4),
            cut in prop_oneof![3 => Just(0usize), 1 => 0..8usize],
        ) {
            let base = Btf::parse(&base_blob()).expect("base");
            if split {
                let data = mutate(split_blob(&base), &bytes, &words, cut);
                if let Ok(btf) = Btf::parse_split(base, &data) {
                    exercise(&btf);
                }
            } else {
                let data = mutate(base_blob(), &bytes, &words, cut);
                if let Ok(btf) = Btf::parse(&data) {
                    exercise(&btf);
                }
            }
        }
    }

    fn host_vmlinux() -> Vec<u8> {
        let path = Path::new(SYSFS_BTF).join("vmlinux");
        std::fs::read(&path).unwrap_or_else(|err| {
            panic!(
                "cannot read {}: {err}; these tests need a kernel with CONFIG_DEBUG_INFO_BTF",
                path.display()
            )
        })
    }

    #[test]
    fn host_vmlinux_btf() {
        let data = host_vmlinux();
        let started = Instant::now();
        let btf = Btf::parse(&data).expect("parse the host's vmlinux BTF");
        let len = btf.member("sk_buff", &["len"]).expect("sk_buff.len");
        assert_eq!(btf.describe(len.type_id), "unsigned int");
        assert_eq!(btf.size_of(len.type_id).expect("size"), 4);
        let sk_buff = btf.size_of(btf.find("sk_buff", |k| k == Kind::Struct).expect("sk_buff"));
        assert!(len.offset + 4 <= sk_buff.expect("size"));
        let rcv = btf.function("tcp_v4_rcv").expect("tcp_v4_rcv");
        assert_eq!(rcv.params.len(), 1);
        assert_eq!(btf.describe(rcv.params[0].type_id), "struct sk_buff *");
        assert_eq!(
            btf.pointee_struct(rcv.params[0].type_id).as_deref(),
            Some("sk_buff")
        );
        assert_eq!(btf.describe(rcv.return_type), "int");
        // Generous: a debug build on a loaded machine; the real figure is a few tens of ms.
        let took = started.elapsed();
        assert!(took.as_secs() < 5, "parsing and looking up took {took:?}");
        // Every type of a real kernel describes and sizes without trouble.
        for id in 0..u32::try_from(btf.type_count()).expect("count") {
            assert!(!btf.describe(id).contains('<') || btf.describe(id).contains("<anonymous>"));
        }
    }

    /// The `.BTF` section of an ELF file.
    fn elf_btf(path: &Path) -> Vec<u8> {
        use object::{Object, ObjectSection};
        let data = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let file = object::File::parse(&*data).expect("ELF");
        let section = file.section_by_name(".BTF").expect(".BTF section");
        section.data().expect(".BTF data").to_vec()
    }

    /// The VM tier's kernel and wireguard module (`tests/vm/build-image.sh` caches them).
    #[test]
    #[ignore = "needs the VM tier's kernel under .tools/vm (tests/vm/build-image.sh)"]
    fn vm_kernel_wireguard_module() {
        let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/vm");
        let kernel = std::fs::read_dir(&vm)
            .unwrap_or_else(|err| panic!("{}: {err}; run tests/vm/build-image.sh", vm.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("kernel-"))
            })
            .expect("a kernel-* directory; run tests/vm/build-image.sh");
        let base = Btf::parse(&elf_btf(&kernel.join("vmlinux"))).expect("vmlinux BTF");
        let btf = Btf::parse_split(base, &elf_btf(&kernel.join("modules/wireguard.ko")))
            .expect("wireguard BTF")
            .with_origin("BTF of module \"wireguard\"");
        println!(
            "{}: split types start at {:?}",
            kernel.display(),
            btf.split_start()
        );

        let insert = btf.function("wg_index_hashtable_insert").expect("function");
        println!("{}: id {}", btf.describe(insert.id), insert.id);
        assert_eq!(insert.params.len(), 2);
        assert_eq!(btf.size_of(insert.return_type).expect("size"), 4);
        assert!(insert.id >= btf.split_start().expect("split"));

        let show = |name: &str, path: &[&str]| {
            let m = btf.member(name, path).expect("member");
            let size = btf.size_of(m.type_id).expect("size");
            println!(
                "{name}.{}: offset {}, {} ({size} bytes)",
                path.join("."),
                m.offset,
                btf.describe(m.type_id)
            );
            (m, size)
        };
        let (peer, _) = show("index_hashtable_entry", &["peer"]);
        assert_eq!(btf.pointee_struct(peer.type_id).as_deref(), Some("wg_peer"));
        let (_, size) = show("index_hashtable_entry", &["index"]);
        assert_eq!(size, 4);
        let (_, _) = show("index_hashtable_entry", &["type"]);
        let (device, _) = show("wg_peer", &["device"]);
        assert_eq!(
            btf.pointee_struct(device.type_id).as_deref(),
            Some("wg_device")
        );
        let (_, size) = show("wg_device", &["incoming_port"]);
        assert_eq!(size, 2);
        let (_, size) = show("wg_peer", &["handshake", "remote_static"]);
        assert_eq!(size, 32);
    }
}
