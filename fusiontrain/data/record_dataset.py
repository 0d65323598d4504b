"""A map-style dataset of samples built from records on demand: :class:`RecordDataset`."""

from __future__ import annotations

from fusiontrain.data.batch import Sample
from fusiontrain.data.formats import SampleBuilder
from fusiontrain.data.sources import RecordSource


class RecordDataset:
    """Samples built from records on demand (in dataloader workers): ``dataset[i]`` reads record
    ``i``, tokenizes it and decodes its images, or raises BadSample."""

    def __init__(self, records: RecordSource, builder: SampleBuilder) -> None:
        self.records = records
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.builder(self.records[index])

    def size(self, index: int) -> tuple[int, ...]:
        """Sample ``index``'s text tokens, images and encoder tokens, then, for each other modality
        of the builder (:attr:`SampleBuilder.others`, in order), its items and their encoder
        tokens: from its tokens alone when every item yields the same token count, else with its
        items decoded and processed.

        Raises:
            BadSample: naming the record.
        """
        builder = self.builder
        image_format = builder.image_format
        formats = [other.input_format for other in builder.others.values()]
        if image_format.tokens_vary or any(fmt.tokens_vary for fmt in formats):
            sample = builder(self.records[index])
            sizes = [len(sample), len(sample.images), sum(image_format.num_tokens(image) for image in sample.images)]
            for name, fmt in zip(builder.others, formats):
                items = sample.items(name)[0]
                sizes += [len(items), sum(fmt.num_tokens(item) for item in items)]
            return tuple(sizes)
        tokenized = builder.tokenize(self.records[index])
        images = len(tokenized.images)
        sizes = [len(tokenized.tokens), images, images * image_format.max_tokens_per_image]
        for name, fmt in zip(builder.others, formats):
            items = len(tokenized.others.get(name, []))
            sizes += [items, items * fmt.max_tokens_per_item]
        return tuple(sizes)
