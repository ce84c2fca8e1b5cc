//! SQL types pgrx has no Rust counterpart for: `name` (so columns match `pg_stat_activity`),
//! `cidr` (so a malformed network is rejected by PostgreSQL's own input function) and caller
//! `text` whose length is checked before it is converted or copied.
//!
//! Caller text reaches Rust as UTF-8, converted from the database encoding by PostgreSQL; in a
//! SQL_ASCII database, bytes that are not UTF-8 are refused (22021, `invalid byte sequence for
//! encoding "UTF8"`), never passed on as a Rust `str`.

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::{Datum, UnboxDatum};
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::impl_sql_translatable;
use pgrx::{direct_function_call, direct_function_call_as_datum, FromDatum, IntoDatum};
use std::borrow::Cow;
use std::ffi::{CStr, CString};

/// A value of SQL type `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl FromDatum for Name {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Name> {
        // SAFETY: a non-null `name` datum points at a NUL-terminated NameData.
        (!is_null)
            .then(|| Name(utf8(unsafe { CStr::from_ptr(datum.cast_mut_ptr()) }.to_bytes()).into_owned()))
    }
}

impl IntoDatum for Name {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let text = CString::new(self.0).ok()?;
        // SAFETY: namein takes a C string and returns a palloc'd NameData.
        unsafe { direct_function_call_as_datum(pg_sys::namein, &[text.as_c_str().into_datum()]) }
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::NAMEOID
    }
}

impl_sql_translatable!(Name, "name");

/// A value of SQL type `cidr`, kept as PostgreSQL prints it (`10.0.0.0/8`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr(pub String);

impl FromDatum for Cidr {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Cidr> {
        if is_null {
            return None;
        }
        // SAFETY: `datum` is a valid cidr; cidr_out returns its text form.
        let text = unsafe { direct_function_call::<&CStr>(pg_sys::cidr_out, &[Some(datum)]) }?;
        Some(Cidr(text.to_string_lossy().into_owned()))
    }
}

impl_sql_translatable!(Cidr, "cidr");

/// A `text` argument as its bytes in the database encoding: `len` is known without copying
/// anything, and `to_str` converts it to UTF-8 (without a copy in a UTF8 database).
#[derive(Debug, Clone, Copy)]
pub struct Text<'a>(&'a [u8]);

impl<'a> Text<'a> {
    /// Length in bytes, in the database encoding.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn to_str(self) -> Cow<'a, str> {
        utf8(self.0)
    }
}

/// Text in the database encoding as UTF-8. A SQL_ASCII database holds any bytes: what is not
/// UTF-8 is refused (22021) with a hint; other encodings are converted by PostgreSQL.
fn utf8(bytes: &[u8]) -> Cow<'_, str> {
    // SAFETY: reads the encoding of the database this backend is connected to.
    let encoding = unsafe { pg_sys::GetDatabaseEncoding() };
    if encoding == pg_sys::pg_enc::PG_UTF8 as i32
        || encoding == pg_sys::pg_enc::PG_SQL_ASCII as i32
        || bytes.is_ascii()
    {
        // In a UTF8 database PostgreSQL checked the text on input; checking again costs a pass.
        return match std::str::from_utf8(bytes) {
            Ok(text) => Cow::Borrowed(text),
            Err(e) => not_utf8(&bytes[e.valid_up_to()..], e.error_len()),
        };
    }
    let len = i32::try_from(bytes.len()).expect("a varlena is shorter than 1 GB");
    // SAFETY: `bytes` holds `len` bytes; pg_server_to_any returns a palloc'd NUL-terminated
    // conversion, or raises ERROR (22P05) for a character UTF-8 cannot hold.
    let converted =
        unsafe { pg_sys::pg_server_to_any(bytes.as_ptr().cast(), len, pg_sys::pg_enc::PG_UTF8 as i32) };
    let converted = if converted.cast_const().cast::<u8>() == bytes.as_ptr() {
        bytes
    } else {
        // SAFETY: a conversion is NUL-terminated.
        unsafe { CStr::from_ptr(converted) }.to_bytes()
    };
    Cow::Owned(String::from_utf8_lossy(converted).into_owned())
}

/// Raises 22021 for text that is not UTF-8, naming the bytes as PostgreSQL does.
fn not_utf8(rest: &[u8], error_len: Option<usize>) -> ! {
    let shown = &rest[..error_len.unwrap_or(rest.len()).min(rest.len()).clamp(1, 4)];
    let bytes: Vec<String> = shown.iter().map(|b| format!("0x{b:02x}")).collect();
    crate::errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        format!("invalid byte sequence for encoding \"UTF8\": {}", bytes.join(" ")),
        "Give names, patterns and reasons in UTF-8: session_kill reads them as UTF-8, and a SQL_ASCII database stores any bytes.",
    )
}

impl<'a> FromDatum for Text<'a> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        typoid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: a non-null `text` datum is a varlena; pgrx detoasts it for the call's lifetime.
        unsafe { <&'a [u8]>::from_polymorphic_datum(datum, is_null, typoid) }.map(Text)
    }
}

// SAFETY: unboxes a `text` array element as its bytes, like pgrx's own `&[u8]`.
unsafe impl UnboxDatum for Text<'_> {
    type As<'src>
        = Text<'src>
    where
        Self: 'src;

    unsafe fn unbox<'src>(datum: Datum<'src>) -> Text<'src>
    where
        Self: 'src,
    {
        // SAFETY: the element is a `text` varlena.
        Text(unsafe { <&[u8]>::unbox(datum) })
    }
}

// SAFETY: converted with the FromDatum impl above, like pgrx's own `&'fcx [u8]` arguments.
unsafe impl<'fcx> ArgAbi<'fcx> for Text<'fcx> {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

impl_sql_translatable!(Text<'_>, "text");

macro_rules! pass_through_datum {
    ($($ty:ty),*) => {$(
        // SAFETY: the value is converted with its FromDatum / IntoDatum impls above, exactly like
        // pgrx's own argument and return types.
        unsafe impl<'fcx> ArgAbi<'fcx> for $ty {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                unsafe { arg.unbox_arg_using_from_datum() }
                    .unwrap_or_else(|| panic!("argument {index} must not be null"))
            }

            unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
                unsafe { arg.unbox_arg_using_from_datum() }.into()
            }
        }
    )*};
}

pass_through_datum!(Name, Cidr);

// SAFETY: boxes a palloc'd NameData produced by IntoDatum, as pgrx does for its own types.
unsafe impl BoxRet for Name {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}
