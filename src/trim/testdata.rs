//! Seeded generator of Synthflow-shaped post-call payloads of a chosen size, for tests and
//! benches (not part of the proxy's behaviour).
//!
//! The shape follows `shared/fixtures/synthflow-post-call.json`; the size comes almost entirely
//! from `call.transcript`, as in real payloads, which mixes ASCII, raw non-ASCII text and
//! `\uXXXX` escapes (including surrogate pairs) so byte-level code sees every kind of token.

/// Tiny xorshift64* generator: deterministic across platforms, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

const BOT: &[&str] = &[
    "Hi, this is Ava from Lakeside Dental. Am I speaking with Dana?",
    "Great! I'm calling to confirm your cleaning on Thursday at 10 a.m.",
    "Of course. Friday at 9:30 or 11:00 — which do you prefer?",
    "Done — Friday at 9:30. You'll get a text confirmation shortly.",
    "Ich habe den Termin für Sie auf Freitag verschoben. Schönen Tag!",
    "Je vous envoie la confirmation par SMS, à très bientôt \\u00e0 la clinique.",
    "Thank you, Dana. Have a lovely day! \\ud83d\\ude00",
    "Let me check the calendar \\u2014 one moment \\u2026",
];

const HUMAN: &[&str] = &[
    "Yes, speaking.",
    "Actually, could we move it to Friday morning? Café meeting on Thursday.",
    "9:30, please.",
    "No, that's all. Thanks! 😀",
    "Können wir das auf nächste Woche verschieben?",
    "She said \\\"call me back\\\" — can you do that?",
    "Привет, это Дана. Да, всё верно.",
    "\\u00bfPuedo cambiar la cita? Gracias \\u00e1 todos.",
];

/// Builds a valid Synthflow post-call payload of about `target_bytes` bytes (at least the
/// fixed fields, a little over 2 KiB), deterministic for a given `seed`.
#[doc(hidden)]
pub fn synthflow_payload(target_bytes: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let head = r#"{
  "status": "completed",
  "error_message": "agent_goodbye",
  "lead": {
    "name": "Dana Okafor",
    "phone_number": "+14155550142"
  },
  "call": {
    "status": "completed",
    "end_call_reason": "human_goodbye",
    "model_id": "1729000000000x111111111111111111",
    "timezone": "Europe/Berlin",
    "call_id": "1732630000000x222222222222222222",
    "duration": 1.0e3,
    "start_time": "2026-11-20T09:14:03.120456+01:00",
    "transcript": ""#;
    let tail = r#"",
    "recording_url": "https://recordings.example.com/1732630000000x222222222222222222.wav",
    "diversion": null,
    "external_id": 12345678901234567890
  },
  "executed_actions": {
    "extract_info_1": {
      "name": "extract_info_1",
      "action_type": "extract_info_action_type",
      "description": "",
      "parameters_hard_coded": {
        "identifier": "new_appointment_time",
        "condition": "if the user asks to reschedule",
        "choices": null,
        "examples": ["Friday 9:30", "Monday afternoon"]
      },
      "error_message": null,
      "return_value": {"new_appointment_time": "Friday 9:30"}
    }
  },
  "analysis": {
    "persona": true,
    "persona_feedback": "",
    "call_flow": "partial",
    "call_flow_feedback": "The agent skipped the insurance check step before confirming.",
    "goal_achieved": true,
    "goal_achieved_feedback": "Confirmed for Friday at 9:30 \u2014 the patient seemed happy.",
    "hallucination": false,
    "hallucination_feedback": ""
  },
  "collected_variables": {
    "agent-7f3c": {
      "user_name": {"value": "Dana", "collected": true},
      "appointment_date": {"value": "2026-11-21", "collected": true}
    }
  }
}
"#;
    let budget = target_bytes.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(head.len() + tail.len() + budget + 128);
    out.extend_from_slice(head.as_bytes());
    let transcript_start = out.len();
    let mut bot = true;
    while out.len() - transcript_start < budget {
        let (who, lines) = if bot { ("bot", BOT) } else { ("human", HUMAN) };
        out.extend_from_slice(b"\\n");
        out.extend_from_slice(who.as_bytes());
        out.extend_from_slice(b": ");
        // Occasional long monologues, as real calls have.
        let sentences = if rng.next().is_multiple_of(16) { 6 } else { 1 };
        for i in 0..sentences {
            if i > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(rng.pick(lines).as_bytes());
        }
        bot = !bot;
    }
    out.extend_from_slice(tail.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_valid_deterministic_and_sized() {
        for size in [0, 10_000, 300_000] {
            let body = synthflow_payload(size, 7);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let transcript = value["call"]["transcript"].as_str().unwrap();
            assert!(size == 0 || transcript.contains('😀'));
            assert!(
                body.len() >= size && body.len() < size.max(2500) + 1000,
                "{size}: {}",
                body.len()
            );
            assert_eq!(body, synthflow_payload(size, 7));
        }
        assert_ne!(synthflow_payload(50_000, 1), synthflow_payload(50_000, 2));
    }
}
