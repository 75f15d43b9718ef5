-- The version of a result's output shape (api::model::output::OUTPUT_VERSION). Results
-- journaled before outputs were versioned hold version-1 shapes and read as version 0.
ALTER TABLE results ADD COLUMN output_version BIGINT NOT NULL DEFAULT 0;
