//! SQL types pgrx has no Rust counterpart for: `name` (so columns match `pg_stat_activity`) and
//! `cidr` (so a malformed network is rejected by PostgreSQL's own input function).

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::impl_sql_translatable;
use pgrx::{direct_function_call, direct_function_call_as_datum, FromDatum, IntoDatum};
use std::ffi::{CStr, CString};

/// A value of SQL type `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl FromDatum for Name {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Name> {
        // SAFETY: a non-null `name` datum points at a NUL-terminated NameData.
        (!is_null)
            .then(|| Name(unsafe { CStr::from_ptr(datum.cast_mut_ptr()) }.to_string_lossy().into_owned()))
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
