//! Content-addressed piece store on disk (see issue 3).
