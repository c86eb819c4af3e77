"""A mixed sample: code, digits, whitespace runs, CJK, emoji, accents, RTL, specials."""
MIXED = [
    "def foo(x):\n    return x**2  # square\n\n\tif (a && b) { return; }\n",
    "1234567890 3.14159 1,000,000 000123 ١٢٣٤٥ ۱۲۳ 99999999999999999999",
    "     leading and trailing spaces     \n\n\n   \r\n\r\n  \t \t\n",
    "你好，世界！这是一个测试。日本語のテキストです。한국어 텍스트",
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧 ✨ flags 🏳️‍🌈",
    "Ça va? naïve café résumé Ångström Straße ŁÓDŹ ı İ",
    "שלום עולם مرحبا بالعالم العربية",
    "I'm you're he's we'll they've I'd I'M YOU'RE HE'S WE'LL THEY'VE I'D 'ſ 'S",
    "<|endoftext|> special in the middle <|endoftext|>",
    "tabs\tand\x0bvertical\x0cform\x1cfeeds\x85next\u2028line\u3000ideo",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.de",
    "'''quotes''' \"double\" ‘curly’ “curly” — dash – en … ellipsis",
    "\u0301combining a\u0301 e\u0308 \u200bzero\u200dwidth\ufeffbom",
    " " * 40 + "x" + "\n" * 10 + "y " + "!" * 30,
    "",
]
