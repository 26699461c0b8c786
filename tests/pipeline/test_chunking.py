import pytest

from indexer.chunking import WIDTH_STEP, chunk_words, window_spans, windows


def words(n):
    return " ".join(f"w{i}" for i in range(n))


@pytest.mark.parametrize("n", [1, 511, 512, 513, 974, 975, 2000])
def test_chunks_cover_text_with_overlap_and_no_redundant_tail(n):
    chunks = chunk_words(words(n), 512, 50)
    assert chunks[0].word_start == 0 and chunks[-1].word_end == n
    for a, b in zip(chunks, chunks[1:]):
        assert b.word_start == a.word_start + 462  # stride = size - overlap
        assert a.word_end - b.word_start == 50  # exactly the overlap
        assert b.word_end > a.word_end  # never wholly inside its predecessor
    for i, c in enumerate(chunks):
        assert c.chunk_index == i
        assert c.text.split() == [f"w{j}" for j in range(c.word_start, c.word_end)]
        assert c.word_end - c.word_start <= 512


def test_chunk_counts():
    assert len(chunk_words(words(512), 512, 50)) == 1
    assert len(chunk_words(words(513), 512, 50)) == 2
    assert len(chunk_words(words(974), 512, 50)) == 2  # 462 + 512 = 974 ends exactly
    assert len(chunk_words(words(975), 512, 50)) == 3
    assert chunk_words("", 512, 50) == []
    assert chunk_words("   \n\t ", 512, 50) == []


def test_max_chunks_cuts_and_overlap_must_be_smaller():
    assert len(chunk_words(words(3000), 512, 50, max_chunks=2)) == 2
    with pytest.raises(ValueError):
        chunk_words(words(10), 50, 50)


@pytest.mark.parametrize("n", [0, 5, 48, 49, 88, 89, 100, 257, 733])
def test_windows_hold_every_token(n):
    ids = list(range(n))
    ws = windows(ids, 48, 8)
    assert all(len(w) <= 48 for w in ws)
    assert set(i for w in ws for i in w) == set(ids)
    if n > 48:
        assert len({len(w) for w in ws}) == 1  # one width: batches of them need no padding
        assert ws[0][0] == 0 and ws[-1][-1] == n - 1
        shared = [a[-1] - b[0] + 1 for a, b in zip(ws, ws[1:])]
        assert min(shared) >= 8  # consecutive windows share at least the overlap
        assert max(shared) - min(shared) <= 1  # spread evenly
        assert len(ws) == -(-(n - 8) // (48 - 8))  # no more windows than that needs
        least = -(-(n + (len(ws) - 1) * 8) // len(ws))
        # the least width that needs, rounded up onto the grid 48, 32, 16 (the forward's batch widths)
        assert len(ws[0]) in (48, 32, 16) and least <= len(ws[0]) < least + WIDTH_STEP


def test_window_widths_sit_on_the_grid_of_batch_widths():
    # 747 tokens at 254/32: 4 windows; 211 tokens would do, 222 (= 254 - 2·16) is the grid's next width
    assert window_spans(747, 254, 32) == (222, [0, 175, 350, 525])
    assert window_spans(747, 254, 0)[0] == 254  # 249 needed, nothing on the grid between it and 254
    assert window_spans(747, 254, 0, step=1) == (249, [0, 249, 498])
    assert window_spans(100, 254, 32) == (100, [0])  # one window: as long as the chunk
