//! Planning post-data from the schema archive's table of contents: which indexes and
//! constraints can be built as soon as one data archive is in, and which must wait for all data.

use std::collections::{BTreeSet, HashMap};
use std::path::Path as FsPath;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use super::conn::last_lines;
use super::{DumpContent, DumpFile};

/// One entry of an archive's table of contents, as `pg_restore --verbose --file=-` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TocEntry {
    id: u32,
    /// `TABLE`, `INDEX`, `CONSTRAINT`, `FK CONSTRAINT`, `TRIGGER`, ...
    kind: String,
    schema: String,
    name: String,
    /// Ids of the entries this one depends on.
    deps: Vec<u32>,
}

/// Parses the comment headers of `pg_restore --verbose --file=-` output (an entry whose name
/// line is missing or unreadable keeps an empty kind, so it is never built early):
///
/// ```text
/// -- TOC entry 3216 (class 2606 OID 16392)
/// -- Dependencies: 214
/// -- Name: a a_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
/// ```
fn parse_toc(sql: &str) -> Vec<TocEntry> {
    let mut entries = Vec::new();
    let mut current: Option<TocEntry> = None;
    for line in sql.lines() {
        if let Some(rest) = line.strip_prefix("-- TOC entry ") {
            entries.extend(current.take());
            current = rest
                .split_whitespace()
                .next()
                .and_then(|id| id.parse().ok())
                .map(|id| TocEntry {
                    id,
                    kind: String::new(),
                    schema: String::new(),
                    name: String::new(),
                    deps: Vec::new(),
                });
        } else if let Some(entry) = current.as_mut() {
            if let Some(deps) = line.strip_prefix("-- Dependencies: ") {
                entry.deps = deps
                    .split_whitespace()
                    .filter_map(|d| d.parse().ok())
                    .collect();
            } else if let Some(header) = line.strip_prefix("-- Name: ") {
                // `Name: N; Type: T; Schema: S; Owner: O`, read from the right: a name may
                // hold "; ", a type or schema name printed here does not.
                let parsed = header.rsplit_once("; Owner: ").and_then(|(left, _)| {
                    let (left, schema) = left.rsplit_once("; Schema: ")?;
                    let (name, kind) = left.rsplit_once("; Type: ")?;
                    Some((name, kind, schema))
                });
                if let Some((name, kind, schema)) = parsed {
                    entry.name = name.to_owned();
                    entry.kind = kind.to_owned();
                    entry.schema = schema.to_owned();
                }
            }
        }
    }
    entries.extend(current);
    entries
}

/// The post-data entries to restore right after each data archive (indexes and constraints
/// on exactly one of its tables, needing nothing else from post-data), and the rest.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PostDataPlan {
    /// Per data archive, in the order given.
    pub(super) early: Vec<Vec<u32>>,
    pub(super) rest: Vec<u32>,
}

fn plan_post_data(pre: &[TocEntry], post: &[TocEntry], archives: &[&DumpContent]) -> PostDataPlan {
    let tables: HashMap<u32, String> = pre
        .iter()
        .filter(|e| e.kind == "TABLE")
        .map(|e| (e.id, format!("{}.{}", e.schema, e.name)))
        .collect();
    // The data archive each table's rows are in: its own, or the main one.
    let mut split_off: HashMap<&str, usize> = HashMap::new();
    for (n, content) in archives.iter().enumerate() {
        if let DumpContent::Tables { tables } = content {
            split_off.extend(tables.iter().map(|t| (t.as_str(), n)));
        }
    }
    let main = archives.iter().position(|c| **c == DumpContent::Data);
    let archive_of = |table: &str| split_off.get(table).copied().or(main);
    let post_ids: BTreeSet<u32> = post.iter().map(|e| e.id).collect();
    let mut plan = PostDataPlan {
        early: vec![Vec::new(); archives.len()],
        rest: Vec::new(),
    };
    for entry in post {
        let on_one_table = || {
            if !matches!(entry.kind.as_str(), "INDEX" | "CONSTRAINT")
                || entry.deps.iter().any(|d| post_ids.contains(d))
            {
                return None;
            }
            let on: BTreeSet<&String> = entry.deps.iter().filter_map(|d| tables.get(d)).collect();
            match on.into_iter().collect::<Vec<_>>()[..] {
                [table] => archive_of(table),
                _ => None,
            }
        };
        match on_one_table() {
            Some(n) => plan.early[n].push(entry.id),
            None => plan.rest.push(entry.id),
        }
    }
    plan
}

/// Reads the schema archive's table of contents (pre-data for the tables, post-data for what
/// to build) and plans post-data around the data archives. Also returns the client encoding
/// the dump's scripts set (`UTF8`, ...), when they set one.
pub(super) async fn post_data_plan(
    pg_restore: &FsPath,
    schema_file: &FsPath,
    data_files: &[&DumpFile],
) -> Result<(PostDataPlan, Option<String>)> {
    let read = |args: [&'static str; 3]| async move {
        let out = Command::new(pg_restore)
            .args(args)
            .arg(schema_file)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run pg_restore {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "pg_restore {} failed ({}): {}",
                args.join(" "),
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 5)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (pre, post, listed) = tokio::try_join!(
        read(["--section=pre-data", "--verbose", "--file=-"]),
        read(["--section=post-data", "--verbose", "--file=-"]),
        read(["--section=post-data", "--list", "--file=-"]),
    )?;
    let encoding = pre.lines().find_map(|line| {
        let quoted = line.strip_prefix("SET client_encoding = '")?;
        Some(quoted.strip_suffix("';")?.to_owned())
    });
    // The SQL (no database: --file=-), whose --verbose comments name each entry; the list.
    let (pre, post, listed) = (parse_toc(&pre), parse_toc(&post), listed_ids(&listed));
    // Every post-data entry must land in one list or another: the plan covers exactly what
    // `pg_restore --list` names, or it is not used.
    let parsed: BTreeSet<u32> = post.iter().map(|e| e.id).collect();
    if parsed != listed {
        bail!(
            "its comments name {} post-data entries, its --list {}",
            parsed.len(),
            listed.len()
        );
    }
    let contents: Vec<&DumpContent> = data_files.iter().map(|f| &f.content).collect();
    Ok((plan_post_data(&pre, &post, &contents), encoding))
}

/// The entry ids of `pg_restore --list` output (`3216; 2606 16392 CONSTRAINT ...`; lines
/// starting with `;` are comments).
fn listed_ids(list: &str) -> BTreeSet<u32> {
    list.lines()
        .filter_map(|line| line.trim_start().split_once(';'))
        .filter_map(|(id, _)| id.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pg_restore --verbose --file=-` of a schema with a foreign key, a partitioned table, a
    /// trigger and a commented index (PostgreSQL 15), comment headers only.
    const PRE_DATA: &str = "\
-- TOC entry 219 (class 1255 OID 16424)
-- Name: trg(); Type: FUNCTION; Schema: public; Owner: postgres
-- TOC entry 214 (class 1259 OID 16385)
-- Name: a; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 215 (class 1259 OID 16395)
-- Name: b c; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 216 (class 1259 OID 16408)
-- Name: p; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 217 (class 1259 OID 16413)
-- Dependencies: 216
-- Name: p1; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 3213 (class 0 OID 0)
-- Dependencies: 217 216
-- Name: p1; Type: TABLE ATTACH; Schema: public; Owner: postgres
";
    const POST_DATA: &str = "\
--
-- TOC entry 3216 (class 2606 OID 16392)
-- Dependencies: 214
-- Name: a a_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
-- Data Pos: 0
--

ALTER TABLE ONLY public.a
    ADD CONSTRAINT a_pkey PRIMARY KEY (id);
-- TOC entry 3220 (class 2606 OID 16401)
-- Dependencies: 215
-- Name: b c b c_pkey; Type: CONSTRAINT; Schema: public; Owner: -
-- TOC entry 3224 (class 2606 OID 16412)
-- Dependencies: 216 216
-- Name: p p_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
-- TOC entry 3227 (class 2606 OID 16417)
-- Dependencies: 3224 217 217 217
-- Name: p1 p1_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
-- TOC entry 3221 (class 1259 OID 16407)
-- Dependencies: 215 215
-- Name: b_k; Type: INDEX; Schema: public; Owner: postgres
-- TOC entry 3385 (class 0 OID 0)
-- Dependencies: 3221
-- Name: INDEX b_k; Type: COMMENT; Schema: public; Owner: postgres
-- TOC entry 3229 (class 0 OID 0)
-- Dependencies: 3224 3227 217 3224 217 216
-- Name: p1_pkey; Type: INDEX ATTACH; Schema: public; Owner: postgres
-- TOC entry 3231 (class 2620 OID 16425)
-- Dependencies: 214 219
-- Name: a t1; Type: TRIGGER; Schema: public; Owner: postgres
-- TOC entry 3230 (class 2606 OID 16402)
-- Dependencies: 214 3216 215
-- Name: b c b c_a_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: postgres
";

    #[test]
    fn reads_a_table_of_contents_from_pg_restore_comments() {
        let pre = parse_toc(PRE_DATA);
        assert_eq!(pre.len(), 6);
        let b = &pre[2];
        assert_eq!(
            (b.id, b.kind.as_str(), b.schema.as_str(), b.name.as_str()),
            (215, "TABLE", "public", "b c")
        );
        let post = parse_toc(POST_DATA);
        let fk = post.last().expect("entries");
        assert_eq!(
            (fk.id, fk.kind.as_str(), fk.name.as_str(), &fk.deps[..]),
            (
                3230,
                "FK CONSTRAINT",
                "b c b c_a_id_fkey",
                &[214, 3216, 215][..]
            )
        );
        assert_eq!(post[1].name, "b c b c_pkey", "an owner of - parses too");
        assert!(parse_toc("SET statement_timeout = 0;\n").is_empty());
        let unreadable = parse_toc("-- TOC entry 7 (class 0 OID 0)\n-- Name: odd\n");
        assert_eq!((unreadable[0].id, unreadable[0].kind.as_str()), (7, ""));
        assert_eq!(
            listed_ids(concat!(
                ";\n",
                "; Archive created at 2026-11-26\n",
                "3216; 2606 16392 CONSTRAINT public a a_pkey -\n",
                "3385; 0 0 COMMENT public INDEX b_k -\n",
            )),
            BTreeSet::from([3216, 3385])
        );
    }

    /// The schema behind `PRE_DATA` and `POST_DATA`.
    const TOC_SCHEMA: &str = "
        CREATE TABLE a (id int PRIMARY KEY, v text UNIQUE, n int CHECK (n > 0));
        CREATE TABLE \"b c\" (id int PRIMARY KEY, a_id int REFERENCES a (id), k text);
        CREATE INDEX b_k ON \"b c\" (lower(k));
        COMMENT ON INDEX b_k IS 'by key';
        CREATE TABLE p (id int, d date, PRIMARY KEY (id, d)) PARTITION BY RANGE (d);
        CREATE TABLE p1 PARTITION OF p FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
        CREATE INDEX p_d ON p (d);
        CREATE MATERIALIZED VIEW mv AS SELECT count(*) FROM a;
        CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
        CREATE TRIGGER t1 BEFORE INSERT ON a FOR EACH ROW EXECUTE FUNCTION trg();";

    /// The plan from a real schema archive: the comments pg_restore prints are the ones the
    /// parser reads, and every post-data entry is planned once.
    #[tokio::test]
    async fn plans_post_data_from_a_real_schema_archive() {
        let cluster = ephemeral_pg::Cluster::start().expect("start a throwaway Postgres");
        cluster.create_database("app").expect("create app");
        cluster.psql("app", TOC_SCHEMA).expect("schema");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("schema.dump");
        let status = std::process::Command::new(cluster.bin_dir().join("pg_dump"))
            .arg(cluster.url("app"))
            .args([
                // As backup_postgres writes its schema archive.
                "--format=custom",
                "--no-owner",
                "--no-acl",
                "--compress=0",
                "--section=pre-data",
                "--section=post-data",
            ])
            .arg(format!("--file={}", file.display()))
            .status()
            .expect("pg_dump");
        assert!(status.success());
        let file_of = |content: DumpContent| DumpFile {
            key: String::new(),
            content,
            size: 0,
            sha256: String::new(),
            dump_size: 0,
        };
        let data = [
            file_of(DumpContent::Data),
            file_of(DumpContent::Tables {
                tables: vec!["public.b c".into()],
            }),
        ];
        let (plan, encoding) = post_data_plan(
            &cluster.bin_dir().join("pg_restore"),
            &file,
            &[&data[0], &data[1]],
        )
        .await
        .expect("plan");
        assert_eq!(encoding.as_deref(), Some("UTF8"));
        // a's key, a's unique key, p's key and p's index | b c's key and index | the rest:
        // the partition's key and index, two index attaches, the comment, the trigger, the
        // foreign key and the materialized view's data.
        let sizes: Vec<usize> = plan.early.iter().map(Vec::len).collect();
        assert_eq!((sizes, plan.rest.len()), (vec![4, 2], 8), "{plan:?}");
    }

    #[test]
    fn builds_a_table_s_indexes_after_its_own_archive_and_the_rest_after_all() {
        let (pre, post) = (parse_toc(PRE_DATA), parse_toc(POST_DATA));
        let tables = DumpContent::Tables {
            tables: vec!["public.b c".into()],
        };
        let plan = plan_post_data(&pre, &post, &[&DumpContent::Data, &tables]);
        assert_eq!(
            plan,
            PostDataPlan {
                // a's and p's (the parent's own, ON ONLY) primary keys with the main data
                // archive; b c's key and index with its own archive.
                early: vec![vec![3216, 3224], vec![3220, 3221]],
                // What needs another post-data entry or more than one table's rows: the
                // partition's key (attached to p's), the index comment, the attach, the
                // trigger, the foreign key.
                rest: vec![3227, 3385, 3229, 3231, 3230],
            }
        );
        // Without a table of contents nothing is built early.
        let plan = plan_post_data(&[], &post, &[&DumpContent::Data]);
        assert!(plan.early[0].is_empty());
        assert_eq!(plan.rest.len(), post.len());
    }
}
