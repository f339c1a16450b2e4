//! Live migration: the stream format, RAM save/load and the migration driver (a later issue).
