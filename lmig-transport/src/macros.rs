//! Declare-once numbers (wire enums, and the few stored in atomics): one list gives the enum (or, for an enum
//! lmig-core defines, the two mappings), the number of each value, the
//! decoding of a number with its error, and each value's name.

/// An enum whose values travel as one byte.
///
/// ```text
/// wire_enum! {
///     /// Docs of the enum.
///     pub enum StreamRole [pub(crate)] {      // [visibility of the methods]
///         /// Docs of the value.
///         Control = 1 => "control",           // number => name
///         ...
///     }
///     unknown |v| WireError::bad("stream role", format!("{v}"))
/// }
/// ```
///
/// gives the enum (`repr(u8)`, `Copy`, `Eq`, `Hash`, `Debug`), `from_u8`
/// (an unknown number is the `unknown` error) and `name` with the methods'
/// visibility, and, inside the crate, `ALL` (every value, in the list's
/// order) and `to_u8`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident [$($fvis:tt)*] {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $num:literal => $text:literal
            ),+ $(,)?
        }
        unknown |$v:ident| $unknown:expr
    ) => {
        $(#[$meta])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        $vis enum $name {
            $(
                $(#[$vmeta])*
                $variant = $num,
            )+
        }

        #[allow(dead_code)]
        impl $name {
            /// Every value, in the order of the declaration.
            pub(crate) const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The value's number on the wire.
            pub(crate) const fn to_u8(self) -> u8 {
                self as u8
            }

            /// The value with this number; an unknown number is an error.
            $($fvis)* fn from_u8($v: u8) -> $crate::wire::Result<Self> {
                match $v {
                    $($num => Ok(Self::$variant),)+
                    _ => Err($unknown),
                }
            }

            /// The value's name.
            $($fvis)* const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}

/// Wire numbers for an enum defined elsewhere (lmig-core's model):
///
/// ```text
/// wire_map! {
///     /// Docs of the mapping.
///     TcpStateKind: tcp_state_to_u8, tcp_state_from_u8 {
///         Established = 0,
///         ...
///     }
///     unknown |v| WireError::bad("TCP state", format!("unknown state {v}"))
/// }
/// ```
///
/// gives `fn tcp_state_to_u8(TcpStateKind) -> u8` and
/// `fn tcp_state_from_u8(u8) -> Result<TcpStateKind>`.
macro_rules! wire_map {
    (
        $(#[$meta:meta])*
        $ty:ident : $to:ident, $from:ident {
            $($variant:ident = $num:literal),+ $(,)?
        }
        unknown |$v:ident| $unknown:expr
    ) => {
        $(#[$meta])*
        fn $to(value: $ty) -> u8 {
            match value {
                $($ty::$variant => $num,)+
            }
        }

        $(#[$meta])*
        fn $from($v: u8) -> $crate::wire::Result<$ty> {
            match $v {
                $($num => Ok($ty::$variant),)+
                _ => Err($unknown),
            }
        }
    };
}
