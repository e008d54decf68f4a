//! A pickle reader for the subset that `torch.save` writes for tensors and plain containers.
//!
//! Pickle is a program for a stack machine that may call any importable Python function. This
//! reader runs none: it builds values, recognises a short allow-list of globals (tensor rebuild
//! functions, storage types, `OrderedDict`, `set`, `_codecs.encode`), and refuses every other
//! global or opcode with an error that names it. Tensors come back as descriptions (storage key,
//! dtype, offset, shape, stride); reading their bytes is the caller's job.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::HashMap;
use std::rc::Rc;

/// Element type of a torch storage, from the storage class named in the persistent id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    /// The name PyTorch prints for the dtype.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::F64 => "float64",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// A storage named by a persistent id: its bytes are the archive entry `data/<key>`.
#[derive(Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` would view its storage (offset and strides in elements).
#[derive(Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The globals a checkpoint may name; everything else is refused when it is first named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    Set,
    FrozenSet,
    CodecsEncode,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(StorageDtype),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            // Protocol 2 spells the builtins module the Python 2 way.
            ("builtins" | "__builtin__", "set") => Self::Set,
            ("builtins" | "__builtin__", "frozenset") => Self::FrozenSet,
            ("_codecs", "encode") => Self::CodecsEncode,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch", class) => Self::Storage(StorageDtype::from_storage_class(class)?),
            _ => return None,
        })
    }
}

/// Tuples are the only values that nest by ownership (containers nest through arena indices),
/// so bounding their depth bounds every recursion over values, Drop included: a hostile pickle
/// of 200,000 nested tuples would otherwise overflow the stack. torch.save nests tuples at most
/// a few deep.
pub const MAX_TUPLE_DEPTH: u16 = 256;

/// A pickled value. Mutable containers live in [`Pickle`]'s arena and are referred to by index,
/// so that memo references see later appends, and copies stay cheap.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// `depth` counts the tuples nested here, this one included (see [`MAX_TUPLE_DEPTH`]).
    Tuple {
        items: Rc<[Value]>,
        depth: u16,
    },
    List(usize),
    Dict(usize),
    Set(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// "a dict", "an int", ...: for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "a bytes object",
            Value::Tuple { .. } => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Set(_) => "a set",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Object {
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
}

/// The result of [`parse`]: the top-level value and the containers it refers to.
#[derive(Debug)]
pub struct Pickle {
    pub root: Value,
    objects: Vec<Object>,
}

impl Pickle {
    /// The entries of a dict value, in insertion order (a repeated key appears twice; the
    /// later entry is the one Python would keep).
    pub fn dict_items(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match v {
            Value::Dict(i) => match self.objects.get(*i) {
                Some(Object::Dict(items)) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value a dict holds under a string key (the last one, as in Python).
    pub fn dict_get<'a>(&'a self, dict: &Value, key: &str) -> Option<&'a Value> {
        self.dict_items(dict)?
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
}

/// Interprets a pickle (protocols 2 to 5, binary opcodes) without executing anything.
/// Errors are one line: what the pickle names in them has its control characters escaped.
pub fn parse(data: &[u8]) -> Result<Pickle> {
    interpret(data).map_err(|e| anyhow!(super::one_line(&e)))
}

fn interpret(data: &[u8]) -> Result<Pickle> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        copied: 0,
    };
    loop {
        let at = m.pos;
        let op = m.byte().context("the pickle ends before its STOP opcode")?;
        if op == b'.' {
            let root = m.pop_any().context("STOP with an empty stack")?;
            return Ok(Pickle {
                root,
                objects: m.objects,
            });
        }
        m.step(op)
            .with_context(|| format!("pickle opcode {} at byte {at}", opcode_name(op)))?;
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objects: Vec<Object>,
    /// Elements copied out of existing values. Memo references make values cheap to repeat,
    /// so copies are limited to what a pickle of this size can honestly need: one per byte.
    copied: usize,
}

impl Machine<'_> {
    fn charge(&mut self, n: usize) -> Result<()> {
        self.copied = self.copied.saturating_add(n);
        ensure!(
            self.copied <= self.data.len(),
            "copies more elements than the pickle has bytes (a decompression bomb?)"
        );
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| {
            anyhow!(
                "needs {n} bytes after byte {}, the pickle has {} left (truncated?)",
                self.pos,
                self.data.len() - self.pos
            )
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len_u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize> {
        usize::try_from(u64::from_le_bytes(self.array()?)).context("length does not fit in memory")
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("unterminated text line"))?;
        let text = std::str::from_utf8(&rest[..n]).context("text line is not UTF-8")?;
        self.pos += n + 1;
        Ok(text.to_owned())
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw).context("string is not valid UTF-8")?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn bytes(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Bytes(Rc::from(self.take(n)?)))
    }

    fn pop_any(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("the stack is empty"))
    }

    fn top(&self) -> Result<&Value> {
        self.stack
            .last()
            .ok_or_else(|| anyhow!("the stack is empty"))
    }

    /// Everything pushed since the last MARK, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("no MARK to pop to"))?;
        ensure!(mark <= self.stack.len(), "MARK lies above the stack top");
        Ok(self.stack.split_off(mark))
    }

    fn new_object(&mut self, o: Object) -> usize {
        self.objects.push(o);
        self.objects.len() - 1
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| anyhow!("memo entry {key} was never stored"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn container(&mut self, below: usize) -> Result<&mut Object> {
        let len = self.stack.len();
        ensure!(len > below, "the stack is too short");
        let idx = match &self.stack[len - 1 - below] {
            Value::List(i) | Value::Dict(i) | Value::Set(i) => *i,
            other => bail!("expects a container on the stack, found {}", other.kind()),
        };
        Ok(&mut self.objects[idx])
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.container(0)? {
            Object::List(v) => v.extend(items),
            _ => bail!("appends to something that is not a list"),
        }
        Ok(())
    }

    fn set_items(&mut self, flat: Vec<Value>) -> Result<()> {
        ensure!(
            flat.len().is_multiple_of(2),
            "odd number of keys and values"
        );
        let Object::Dict(d) = self.container(0)? else {
            bail!("sets items on something that is not a dict");
        };
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn add_items(&mut self, items: Vec<Value>) -> Result<()> {
        match self.container(0)? {
            Object::Set(v) => v.extend(items),
            _ => bail!("adds items to something that is not a set"),
        }
        Ok(())
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<()> {
        let g = Global::resolve(module, name).ok_or_else(|| {
            anyhow!(
                "pickle global `{module}.{name}` is not allowed (only tensors and plain containers are read)"
            )
        })?;
        self.stack.push(Value::Global(g));
        Ok(())
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                let proto = self.byte()?;
                ensure!(proto <= 5, "unknown pickle protocol {proto}");
            }
            // A frame is only a read-ahead hint: its opcodes follow inline.
            0x95 => {
                self.array::<8>()?;
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop_any()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => self.stack.push(self.top()?.clone()),
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.byte()?;
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            0x8a => {
                let n = self.byte()? as usize;
                let v = long_le(self.take(n)?)?;
                self.stack.push(Value::Int(v));
            }
            0x8b => {
                let n = self.len_u32()?;
                let v = long_le(self.take(n)?)?;
                self.stack.push(Value::Int(v));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.stack.push(Value::Float(v));
            }
            b'X' => {
                let n = self.len_u32()?;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            0x8c => {
                let n = self.byte()? as usize;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = self.len_u64()?;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            b'C' => {
                let n = self.byte()? as usize;
                let v = self.bytes(n)?;
                self.stack.push(v);
            }
            b'B' => {
                let n = self.len_u32()?;
                let v = self.bytes(n)?;
                self.stack.push(v);
            }
            0x8e => {
                let n = self.len_u64()?;
                let v = self.bytes(n)?;
                self.stack.push(v);
            }
            b')' => self.stack.push(tuple(Vec::new())?),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(tuple(items)?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                ensure!(self.stack.len() >= n, "the stack is too short");
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(tuple(items)?);
            }
            b']' => {
                let i = self.new_object(Object::List(Vec::new()));
                self.stack.push(Value::List(i));
            }
            b'l' => {
                let items = self.pop_mark()?;
                let i = self.new_object(Object::List(items));
                self.stack.push(Value::List(i));
            }
            b'a' => {
                let v = self.pop_any()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'}' => {
                let i = self.new_object(Object::Dict(Vec::new()));
                self.stack.push(Value::Dict(i));
            }
            b'd' => {
                let flat = self.pop_mark()?;
                let i = self.new_object(Object::Dict(Vec::new()));
                self.stack.push(Value::Dict(i));
                self.set_items(flat)?;
            }
            b's' => {
                let v = self.pop_any()?;
                let k = self.pop_any()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let flat = self.pop_mark()?;
                self.set_items(flat)?;
            }
            0x8f => {
                let i = self.new_object(Object::Set(Vec::new()));
                self.stack.push(Value::Set(i));
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.add_items(items)?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                let i = self.new_object(Object::Set(items));
                self.stack.push(Value::Set(i));
            }
            b'q' => {
                let k = self.byte()?;
                self.memo_put(k.into())?;
            }
            b'r' => {
                let k = u32::from_le_bytes(self.array()?);
                self.memo_put(k.into())?;
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.byte()?;
                self.memo_get(k.into())?;
            }
            b'j' => {
                let k = u32::from_le_bytes(self.array()?);
                self.memo_get(k.into())?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop_any()?;
                let module = self.pop_any()?;
                match (module.as_str(), name.as_str()) {
                    (Some(m), Some(n)) => self.push_global(m, n)?,
                    _ => bail!("module and name are not strings"),
                }
            }
            b'Q' => {
                let pid = self.pop_any()?;
                let storage = persistent_load(&pid)?;
                self.charge(storage.key.len())?;
                self.stack.push(Value::Storage(Rc::new(storage)));
            }
            // NEWOBJ (cls.__new__(cls, *args)) is treated as a call: the allowed classes build
            // the same value either way.
            b'R' | 0x81 => {
                let args = self.pop_any()?;
                let callable = self.pop_any()?;
                let v = self.call(&callable, &args)?;
                self.stack.push(v);
            }
            b'b' => {
                let state = self.pop_any()?;
                match self.top()? {
                    // OrderedDict state is the `_metadata` attribute of a state dict: not needed.
                    Value::Dict(_) => {}
                    other => bail!(
                        "sets the state of {} ({}), which is not supported",
                        other.kind(),
                        state.kind()
                    ),
                }
            }
            _ => bail!("is not supported (only the opcodes torch.save writes are read)"),
        }
        Ok(())
    }

    fn call(&mut self, callable: &Value, args: &Value) -> Result<Value> {
        let Value::Global(g) = callable else {
            bail!("calls {}, which is not callable", callable.kind());
        };
        let Value::Tuple { items: args, .. } = args else {
            bail!("call arguments are {}, not a tuple", args.kind());
        };
        Ok(match (*g, &args[..]) {
            (Global::OrderedDict, []) => Value::Dict(self.new_object(Object::Dict(Vec::new()))),
            (Global::Set | Global::FrozenSet, []) => {
                Value::Set(self.new_object(Object::Set(vec![])))
            }
            (Global::Set | Global::FrozenSet, [Value::List(i)]) => {
                let items = match &self.objects[*i] {
                    Object::List(items) => items.clone(),
                    _ => bail!("set() argument is not a list"),
                };
                self.charge(items.len())?;
                Value::Set(self.new_object(Object::Set(items)))
            }
            (Global::CodecsEncode, [Value::Str(text), Value::Str(enc)])
                if matches!(&**enc, "latin1" | "latin-1") =>
            {
                // Protocol 2 stores bytes as latin-1 text: each char is one byte.
                let raw = text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).context("non-latin-1 character"))
                    .collect::<Result<Vec<u8>>>()?;
                self.charge(raw.len())?;
                Value::Bytes(Rc::from(raw))
            }
            (Global::RebuildTensorV2, [s, off, size, stride, _, _])
            | (Global::RebuildTensorV2, [s, off, size, stride, _, _, _])
            | (Global::RebuildTensor, [s, off, size, stride]) => {
                let t = rebuild_tensor(s, off, size, stride)?;
                self.charge(2 * t.shape.len())?;
                Value::Tensor(Rc::new(t))
            }
            (Global::RebuildParameter, [t @ Value::Tensor(_), _, _])
            | (Global::RebuildParameterWithState, [t @ Value::Tensor(_), _, _, _]) => t.clone(),
            (g, a) => bail!("calls {g:?} with {} argument(s) it does not take", a.len()),
        })
    }
}

/// A tuple of `items`, refused when it would nest deeper than [`MAX_TUPLE_DEPTH`].
fn tuple(items: Vec<Value>) -> Result<Value> {
    let inner = items
        .iter()
        .map(|v| match v {
            Value::Tuple { depth, .. } => *depth,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    ensure!(
        inner < MAX_TUPLE_DEPTH,
        "tuples nest deeper than {MAX_TUPLE_DEPTH} levels (a hostile pickle?)"
    );
    Ok(Value::Tuple {
        items: Rc::from(items),
        depth: inner + 1,
    })
}

/// `persistent_load(('storage', storage_type, key, location, numel))`, as torch.save writes it.
fn persistent_load(pid: &Value) -> Result<StorageRef> {
    let Value::Tuple { items: t, .. } = pid else {
        bail!("persistent id is {}, not a tuple", pid.kind());
    };
    match &t[..] {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, Value::Int(numel)]
            if &**tag == "storage" =>
        {
            let numel = u64::try_from(*numel).context("negative storage size")?;
            Ok(StorageRef {
                key: key.to_string(),
                dtype: *dtype,
                numel,
            })
        }
        _ => bail!("persistent id is not ('storage', <storage type>, key, location, numel)"),
    }
}

fn rebuild_tensor(
    storage: &Value,
    offset: &Value,
    size: &Value,
    stride: &Value,
) -> Result<TensorRef> {
    let Value::Storage(storage) = storage else {
        bail!("tensor rebuilt from {}, not a storage", storage.kind());
    };
    let Value::Int(offset) = offset else {
        bail!("tensor storage offset is {}", offset.kind());
    };
    let offset = u64::try_from(*offset).context("negative tensor storage offset")?;
    let shape = dims(size, "size")?;
    let stride = dims(stride, "stride")?;
    ensure!(
        shape.len() == stride.len(),
        "tensor size {shape:?} and stride {stride:?} differ in rank"
    );
    Ok(TensorRef {
        storage: storage.clone(),
        offset,
        shape,
        stride,
    })
}

fn dims(v: &Value, what: &str) -> Result<Vec<usize>> {
    let Value::Tuple { items: t, .. } = v else {
        bail!("tensor {what} is {}, not a tuple", v.kind());
    };
    t.iter()
        .map(|d| match d {
            Value::Int(i) => {
                usize::try_from(*i).with_context(|| format!("tensor {what} has negative entry {i}"))
            }
            other => bail!("tensor {what} has {} entry", other.kind()),
        })
        .collect()
}

/// Python's LONG1/LONG4 payload: little-endian two's complement of any width.
fn long_le(raw: &[u8]) -> Result<i64> {
    ensure!(
        raw.len() <= 8,
        "integer of {} bytes does not fit in 64 bits",
        raw.len()
    );
    let Some(&last) = raw.last() else {
        return Ok(0);
    };
    let fill = if last & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 8];
    buf[..raw.len()].copy_from_slice(raw);
    Ok(i64::from_le_bytes(buf))
}

fn opcode_name(op: u8) -> String {
    let name = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'(' => "MARK",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'G' => "BINFLOAT",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        b'C' => "SHORT_BINBYTES",
        b'B' => "BINBYTES",
        0x8e => "BINBYTES8",
        b')' => "EMPTY_TUPLE",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b']' => "EMPTY_LIST",
        b'l' => "LIST",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b'}' => "EMPTY_DICT",
        b'd' => "DICT",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        b'b' => "BUILD",
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        b'P' => "PERSID",
        0x82..=0x84 => "EXT",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return format!("0x{op:02x}"),
    };
    format!("{name} (0x{op:02x})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_widths_and_signs() {
        assert_eq!(long_le(&[]).unwrap(), 0);
        assert_eq!(long_le(&[0xff]).unwrap(), -1);
        assert_eq!(long_le(&[0x80, 0x00]).unwrap(), 128);
        assert_eq!(long_le(&[0x03, 0, 0, 0, 0, 1]).unwrap(), (1 << 40) + 3);
        assert!(long_le(&[0; 9]).is_err());
    }

    #[test]
    fn memo_sees_later_mutation() {
        // {} BINPUT 0, 'a' 1 SETITEM, POP, BINGET 0, STOP: the memoised dict must hold a: 1.
        let p = parse(b"\x80\x02}q\x00\x8c\x01aK\x01s0h\x00.").unwrap();
        assert!(matches!(p.dict_get(&p.root, "a"), Some(Value::Int(1))));
    }

    #[test]
    fn copies_are_bounded() {
        // A 100-element list, then set(list) 1000 times through memo references.
        let mut p = b"\x80\x02]q\x00(".to_vec();
        p.extend(std::iter::repeat_n(*b"K\x07", 100).flatten());
        p.extend_from_slice(b"ec__builtin__\nset\nq\x010");
        p.extend(std::iter::repeat_n(*b"h\x01h\x00\x85R0", 1000).flatten());
        p.push(b'.');
        let e = parse(&p).unwrap_err();
        assert!(format!("{e:#}").contains("decompression bomb"), "{e:#}");
    }

    #[test]
    fn deep_tuples_are_refused() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85, 200_000));
        p.push(b'.');
        let e = parse(&p).unwrap_err();
        assert!(format!("{e:#}").contains("nest deeper than 256"), "{e:#}");
    }

    #[test]
    fn refuses_unknown_globals_and_opcodes() {
        let e = parse(b"\x80\x02cos\nsystem\n.").unwrap_err();
        assert!(
            format!("{e:#}").contains("`os.system` is not allowed"),
            "{e:#}"
        );
        let e = parse(b"\x80\x02ctorch\nload\n.").unwrap_err();
        assert!(format!("{e:#}").contains("`torch.load`"), "{e:#}");
        let e = parse(b"\x80\x02(i__main__\nX\n.").unwrap_err();
        assert!(format!("{e:#}").contains("INST (0x69) at byte 3"), "{e:#}");
    }
}
