import wordfreq

words = sorted({w for w in wordfreq.iter_wordlist("en", "large")
                if w.isascii() and w.isalpha() and 2 <= len(w) <= 3 and wordfreq.zipf_frequency(w, "en") >= 2.5})
header = """# English words and abbreviations of 2-3 letters used at least 0.3 times per million words (Zipf frequency
# >= 2.5): tokens with a meaning a text encoder has learnt, never suggested as an identifier.
# From wordfreq 3.1.1's "large" English list (data: CC BY-SA 4.0, Robyn Speer; https://github.com/rspeer/wordfreq).
# Made with: pip install wordfreq==3.1.1 && python scripts/make_known_words.py > src/dreambooth/known_words.txt
"""
print(header + "\n".join(words))
