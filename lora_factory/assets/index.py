import dagster as dg
import pandas as pd

from lora_factory.assets.metadata import table_metadata
from lora_factory.engines import step_tags
from lora_factory.index.character_index import index_hash
from lora_factory.resources import CharacterIndex, FactoryStorage
from lora_factory.storage import write_table


@dg.asset(
    group_name="index",
    code_version="1",
    op_tags=step_tags(gpu=False),
    description=(
        "The character index: one row per character (key, names, franchise, gender, "
        "per-site tag overrides, reference images, enabled). Each enabled row is one "
        "partition of every per-character asset."
    ),
)
def character_index(
    context: dg.AssetExecutionContext, storage: FactoryStorage, character_index: CharacterIndex
) -> dg.MaterializeResult:
    rows = character_index.rows()
    frame = pd.DataFrame(
        [
            {
                "key": row.key,
                "display_name": row.display_name,
                "franchise": row.franchise,
                "names": ", ".join(row.all_names),
                "gender": row.gender,
                "trigger_word": row.trigger,
                "site_tags": ", ".join(f"{site}={tag}" for site, tag in row.site_tags.items()),
                "enabled": row.enabled,
                "row_hash": row.content_hash(),
            }
            for row in rows
        ]
    )
    path = storage.store().root / "tables" / "character_index.parquet"
    write_table(frame, path)
    context.log.info(f"index {character_index.index_path}: {len(rows)} characters")
    return dg.MaterializeResult(
        metadata={
            "characters": len(rows),
            "enabled": int(frame["enabled"].sum()) if len(frame) else 0,
            "index_file": dg.MetadataValue.path(character_index.index_path),
            "characters_table": table_metadata(frame),
        },
        data_version=dg.DataVersion(index_hash(rows)),
    )
