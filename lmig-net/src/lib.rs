//! lmig-net (skeleton; see the issue).
#![deny(unsafe_code)]
